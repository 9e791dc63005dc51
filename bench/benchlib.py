"""Shared machinery of the benchmark suites: run mode, environment, timing, tags and side reports.

Every timed case goes through :func:`measure`, which tags the pytest-benchmark record with
``extra_info``: the suite, the case, the implementation, the environment (device, torch/triton
versions, thread count, dtype), the work done (visible attention elements, bytes moved, tokens)
and, for our own implementations, the baselines to compare with (:class:`Compare`). The summary
(``perf_summary.py``) forms the ratios from those tags alone.

Things that are not timings — an implementation that is unavailable on this platform, tile counts,
the static kernel table, the memory model — go to :data:`RECORD` and are saved in the same JSON.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["CONFIG", "RECORD", "Compare", "environment", "measure", "num_threads", "device",
           "try_import", "compile_works", "missing_piece", "probe"]


@dataclass
class BenchConfig:
    """How this session runs: set once by ``bench/conftest.py`` from the command line."""

    full: bool = False              # --benchmark: real timings; otherwise every body runs once
    device: str = "cpu"             # "cuda" when a GPU is present, else "cpu"

    @property
    def mode(self) -> str:
        return "full" if self.full else "smoke"

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


CONFIG = BenchConfig()
GPU_MIN_ROUNDS = 20
GPU_MIN_WARMUP = 10


@dataclass
class Record:
    """Non-timing results of the session, saved under ``transfusion_fast`` in the JSON."""

    unavailable: list = field(default_factory=list)   # {"suite", "case", "impl", "reason"}
    reports: dict = field(default_factory=dict)       # title -> {"note", "rows": [dict, ...]}

    def mark_unavailable(self, suite: str, case: str, impl: str, reason: str) -> None:
        entry = {"suite": suite, "case": case, "impl": impl, "reason": reason}
        if entry not in self.unavailable:
            self.unavailable.append(entry)

    def add_report(self, title: str, rows: list[dict], note: str = "",
                   readme_rows: list[dict] | None = None) -> None:
        """A side table; ``readme_rows``: a condensed form for the README (the JSON and the
        terminal keep every row)."""
        report = self.reports.setdefault(title, {"note": note, "rows": []})
        report["rows"].extend(rows)
        if note:
            report["note"] = note
        if readme_rows is not None:
            report["readme_rows"] = readme_rows

    def as_dict(self) -> dict:
        return asdict(self)


RECORD = Record()


@dataclass(frozen=True)
class Compare:
    """One ratio the summary forms for a subject row against a baseline row of the same case.

    ``metric``: ``"speedup"`` = t_baseline / t_subject; ``"per_work"`` = (work/t) of the subject
    over (work/t) of the baseline (efficiency per visible element, or bandwidth fraction when the
    work is bytes moved); ``"memory"`` = retained bytes of the baseline / of the subject.
    ``goal``: the ratio the issue asks for (``None``: reported without a goal).
    """

    baseline: str
    metric: str = "speedup"
    goal: float | None = None


def device() -> torch.device:
    return torch.device(CONFIG.device)


def synchronize() -> None:
    if CONFIG.on_gpu:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


def environment(threads: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """Device, versions, thread count and dtype: stored with every figure."""
    dev = device()
    return {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``n`` intra-op threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(benchmark, fn, *, suite: str, case: str, impl: str, dtype=None, threads=None,
            work: float | None = None, work_unit: str = "", flops: float | None = None,
            moved_bytes: float | None = None, tokens: float | None = None,
            compare: tuple[Compare, ...] = (), rounds: int = 5, warmup: int = 1, **extra):
    """Time ``fn`` (synchronizing the GPU inside the timed region) and tag the record.

    In smoke mode pytest-benchmark is disabled and ``fn`` runs exactly once.
    Returns what ``fn`` returned.
    """
    benchmark.group = f"{suite}: {case}"
    benchmark.extra_info.update({
        "suite": suite, "case": case, "impl": impl, "role": "subject" if compare else "baseline",
        "compare": [asdict(c) for c in compare], "work": work, "work_unit": work_unit,
        "flops": flops, "bytes": moved_bytes, "tokens": tokens, **environment(threads, dtype),
        **extra,
    })

    def timed():
        out = fn()
        synchronize()
        return out

    if CONFIG.on_gpu:
        # A GPU idles at a low clock: a few millisecond-long rounds would time the ramp-up, not
        # the kernels (seen on an H100: the same forward 0.57 ms in a 150 ms do_bench loop, 0.9 ms
        # in 5 single rounds). Warm up for 10 rounds and take the median of at least 20.
        rounds, warmup = max(rounds, GPU_MIN_ROUNDS), max(warmup, GPU_MIN_WARMUP)
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


def try_import(module: str):
    """``(module, None)`` or ``(None, reason)``: a missing optional piece is reported, not fatal."""
    import importlib
    try:
        return importlib.import_module(module), None
    except Exception as error:  # ImportError, or a half-written module raising at import
        return None, f"{type(error).__name__}: {error}"


_MISSING_MARKERS = ("does not exist", "is not built", "undefined symbol", "No module named",
                    "has no attribute")


def missing_piece(error: BaseException) -> bool:
    """Whether ``error`` says a piece is not there yet (an op not compiled into the extension, a
    module not written), as opposed to a piece that is there and broken (which must fail)."""
    if isinstance(error, (ImportError, AttributeError)):
        return True
    return any(marker in str(error) for marker in _MISSING_MARKERS)


def probe(fn) -> str:
    """Run ``fn`` once: ``""`` if it works, the reason if a piece is missing; other errors raise."""
    try:
        fn()
    except Exception as error:
        if not missing_piece(error):
            raise
        return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return ""


def compile_works() -> tuple[bool, str]:
    """Whether torch.compile (inductor) can build code on this machine."""
    return _compile_probe()


@functools.lru_cache(maxsize=None)
def _compile_probe() -> tuple[bool, str]:
    try:
        fn = torch.compile(lambda x: x * 2 + 1)
        ok = bool(torch.equal(fn(torch.ones(4, device=device())), torch.full((4,), 3.0, device=device())))
        return ok, "" if ok else "torch.compile returned a wrong result"
    except Exception as error:
        return False, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
