"""Benchmark harness: ``pytest bench/ --benchmark`` for real figures, ``pytest bench/`` as a smoke test.

pytest-benchmark has no ``--benchmark`` flag; this file registers it.

* With ``--benchmark``: every suite runs at its real sizes with pytest-benchmark timing, the JSON
  (timings, the tags of every record, the environment, what was unavailable and the side reports)
  is saved to ``bench/results/latest.json`` (unless ``--benchmark-json PATH`` is given), and one
  summary table of ratios against the baselines measured in the same run is printed. The JSON is
  written to a side file and moved over ``latest.json`` once the run has finished, so an
  interrupted run never leaves a truncated file behind. ``TRANSFUSION_FAST_BENCH_RESULTS=DIR``
  puts ``latest.json`` in DIR instead (the test of this saving path uses it).
  ``python scripts/perf_report.py`` turns that JSON into the README "Performance" section.
* Without it: pytest-benchmark is disabled (``--benchmark-disable``), so every benchmark body runs
  exactly once at tiny sizes: the CI smoke test that keeps the suites working. Nothing is saved.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import benchlib
import perf_summary

RESULTS_DIR = Path(os.environ.get("TRANSFUSION_FAST_BENCH_RESULTS")
                   or Path(__file__).resolve().parent / "results")
LATEST = RESULTS_DIR / "latest.json"
_PARTIAL = RESULTS_DIR / f".latest.json.{os.getpid()}.partial"   # one per run: runs may overlap
_SAVED: dict = {}


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="transfusion_fast: run the benchmark suites for real (timings, JSON in "
                          "bench/results/latest.json, summary table of ratios). Without it every "
                          "benchmark runs once at tiny sizes as a smoke test.")


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads these options.
    full = bool(config.getoption("--benchmark"))
    # An implementation that cannot run here is recorded as unavailable (and shown in the
    # summary) instead of being timed: pytest-benchmark's "fixture not used" warning is noise then.
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used at all")
    benchlib.CONFIG.full = full
    benchlib.CONFIG.device = "cuda" if torch.cuda.is_available() else "cpu"
    if full:
        config.option.benchmark_disable = False
        config.option.benchmark_enable = True
        if config.option.benchmark_json is None:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            # A path, as `--benchmark-json PATH` gives it (pytest-benchmark 5 opens it itself):
            # the side file, moved over latest.json only once the run has finished.
            config.option.benchmark_json = _PARTIAL
    else:
        config.option.benchmark_disable = True


def _command(config) -> str:
    return " ".join(["pytest", *config.invocation_params.args])


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["transfusion_fast"] = benchlib.environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    environment = benchlib.environment()
    environment["cpu_count"] = os.cpu_count()
    output_json["transfusion_fast"] = {
        "mode": benchlib.CONFIG.mode,
        "command": _command(config),
        "statistic": perf_summary.STATISTIC,
        "environment": environment,
        **benchlib.RECORD.as_dict(),
    }
    output_json["transfusion_fast"]["summary"] = perf_summary.summarize(output_json)
    _SAVED["data"] = output_json


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not benchlib.CONFIG.full:
        terminalreporter.write_line(
            "bench/: smoke mode, every benchmark body ran once at tiny sizes (no timings); "
            "run `pytest bench/ --benchmark` for figures.")
        return
    data = _SAVED.get("data")
    if data is None:
        terminalreporter.write_line("bench/: no benchmark record was produced, nothing saved.")
        return
    if _PARTIAL.exists():
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            terminalreporter.write_line(f"bench/: interrupted, {LATEST} left as it was.")
            return
        os.replace(_PARTIAL, LATEST)
        where = LATEST
    else:
        where = config.option.benchmark_json or "(not saved)"
    terminalreporter.write_sep("=", "transfusion_fast: ratios against baselines of this run")
    terminalreporter.write_line(perf_summary.format_text(data))
    terminalreporter.write_line(f"\nSaved: {where}. README section: python scripts/perf_report.py")


def pytest_unconfigure(config):
    # A side file that was not moved over latest.json (interrupted run) is dropped.
    _PARTIAL.unlink(missing_ok=True)
