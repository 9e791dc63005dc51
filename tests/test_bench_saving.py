"""`pytest bench/ --benchmark` saves its JSON and prints the ratio table with the installed
pytest-benchmark: one tiny suite runs with --benchmark in a child pytest, through the real saving
path of bench/conftest.py (side file, then moved over latest.json), into a temporary directory.
A change of the plugin's API (it once took an open file, now a path) fails here first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The cheapest comparison of the suites: the Layout against create_block_mask at T = 2,048.
NODES = ["bench/test_bench_layout.py::test_layout_build[1-ours]",
         "bench/test_bench_layout.py::test_layout_build[1-cbm-plain]"]
FAST = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off",
        "--benchmark-calibration-precision=1"]


def _run_bench(results: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRANSFUSION_FAST_BENCH_RESULTS=str(results))
    return subprocess.run([sys.executable, "-m", "pytest", *NODES, "--benchmark", *FAST, "-q",
                           "-p", "no:cacheprovider", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_benchmark_run_saves_latest_json_and_prints_the_ratio_table(tmp_path):
    repo_latest = ROOT / "bench" / "results" / "latest.json"
    before = repo_latest.stat().st_mtime_ns if repo_latest.exists() else None
    run = _run_bench(tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    saved = tmp_path / "latest.json"
    assert saved.is_file(), run.stdout[-3000:]
    data = json.loads(saved.read_text())
    impls = sorted(b["extra_info"]["impl"] for b in data["benchmarks"])
    assert impls == ["Layout+tile table", "cbm-plain"], impls
    ours = data["transfusion_fast"]
    assert ours["mode"] == "full" and ours["command"].startswith("pytest ")
    assert any(row["baseline"] == "cbm-plain" and row["ratio"] > 0
               for row in ours["summary"])
    assert "ratios against baselines of this run" in run.stdout
    assert f"Saved: {saved}" in run.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"], "a side file was left behind"
    after = repo_latest.stat().st_mtime_ns if repo_latest.exists() else None
    assert after == before, "the run wrote the repository's bench/results/latest.json"


def test_benchmark_json_path_given_on_the_command_line_is_used(tmp_path):
    target = tmp_path / "elsewhere" / "run.json"
    target.parent.mkdir()
    run = _run_bench(tmp_path / "results", "--benchmark-json", str(target))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert len(json.loads(target.read_text())["benchmarks"]) == 2
    assert not (tmp_path / "results" / "latest.json").exists()
    assert f"Saved: {target}" in run.stdout
