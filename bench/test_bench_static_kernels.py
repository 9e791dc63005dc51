"""Static kernel report: every shipped Triton kernel config compiled ahead of time for sm_80 and
sm_90a (no GPU needed): registers, spills, shared memory, tensor-core instructions.

The configs come from ``aot_specs()`` of each op family (``transfusion_fast.kernels.<name>``;
attention's in ``attention_diagnostics``);
``transfusion_fast.aot.compile_report`` compiles them in a subprocess and runs ptxas. A spec list
that takes an ``arch`` argument is compiled for that arch only (its tile sizes are per generation).

Compiling several hundred configs takes many minutes on a small CPU machine, so full runs keep the
figures in ``bench/results/aot_cache.json`` keyed by the spec, the arch, the Triton version and a
hash of the sources of the listing module and of the kernels' modules (a config is recompiled
whenever any of those changes), compile in
chunks (saving after each) within a time budget, and report how many figures were compiled in this
run, how many were reused, and how many are still pending (the next run continues). The smoke run
compiles one config per kernel file for sm_80, always fresh.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import time
from pathlib import Path

import benchlib
from benchlib import CONFIG, RECORD

SUITE = "static kernels"
#: op family -> the module (under transfusion_fast.kernels) whose aot_specs() lists its configs
KERNEL_FILES = {"attention": "attention_diagnostics", "rope": "rope", "swiglu": "swiglu",
                "rms_norm": "rms_norm",
                "linear_cross_entropy": "linear_cross_entropy"}
CACHE = Path(__file__).resolve().parent / "results" / "aot_cache.json"
#: seconds of compiling per full run (the rest is pending for the next run); chunk = one subprocess
BUDGET_S = 150
CHUNK = 12


def _specs(module, archs) -> list[tuple]:
    """(spec, arch) pairs of a kernel file's shipped configs."""
    if "arch" in inspect.signature(module.aot_specs).parameters:
        return [(spec, arch) for arch in archs for spec in module.aot_specs(arch)]
    return [(spec, arch) for spec in module.aot_specs() for arch in archs]


def _source_hash(module_names) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(module_names)):
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()


def _key(spec, arch: int, triton_version: str, source: str) -> str:
    payload = json.dumps({"spec": dataclasses.asdict(spec), "arch": arch, "triton": triton_version,
                          "source": source}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def test_static_kernel_report():
    import triton

    from transfusion_fast.aot import ARCHS, compile_report

    pairs, sources = [], {}
    for name, listing in KERNEL_FILES.items():
        module_name = f"transfusion_fast.kernels.{listing}"
        module, error = benchlib.try_import(module_name)
        if module is None or not hasattr(module, "aot_specs"):
            RECORD.mark_unavailable(SUITE, name, "aot_specs", error or f"{module_name} has no aot_specs()")
            continue
        found = _specs(module, ARCHS if CONFIG.full else (80,))
        pairs += [(name, spec, arch) for spec, arch in (found if CONFIG.full else found[:1])]
        sources[name] = _source_hash([module_name, *(spec.module for spec, _ in found)])

    cache = _load_cache() if CONFIG.full else {}
    keys = [_key(spec, arch, triton.__version__, sources[name]) for name, spec, arch in pairs]
    # Round-robin over the kernel files so that a partial run covers every file.
    todo = sorted((i for i, key in enumerate(keys) if key not in cache),
                  key=lambda i: (sum(1 for j in range(i) if pairs[j][0] == pairs[i][0]), i))
    reports: dict[int, dict] = {}
    started = time.monotonic()
    while todo and (not CONFIG.full or time.monotonic() - started < BUDGET_S):
        arch = pairs[todo[0]][2]
        chunk = [i for i in todo if pairs[i][2] == arch][:CHUNK]
        compiled = compile_report([pairs[i][1] for i in chunk], archs=(arch,))
        assert len(compiled) == len(chunk)
        for i, report in zip(chunk, compiled):
            reports[i] = dataclasses.asdict(report)
            if CONFIG.full and not report.error:
                cache[keys[i]] = reports[i]
        todo = [i for i in todo if i not in reports]
        if CONFIG.full:
            CACHE.parent.mkdir(exist_ok=True)
            CACHE.write_text(json.dumps(cache, indent=0, sort_keys=True))

    rows = []
    for i, (name, spec, arch) in enumerate(pairs):
        report = reports.get(i) or cache.get(keys[i])
        if report is None:
            continue
        rows.append({"file": name, "config": report["label"], "arch": report["arch"],
                     "registers": report["registers"],
                     "spills (st/ld B)": f"{report['spill_stores']}/{report['spill_loads']}",
                     "shared B": report["shared_bytes"], "tensor cores": "yes" if report["tensor_cores"] else "no",
                     "warps/stages": f"{report['num_warps']}/{report['num_stages']}",
                     "status": report["error"][:120] if report["error"] else "ok"})
    pending = len(pairs) - len(rows)
    assert len(rows) == len(reports) + sum(1 for i in range(len(pairs)) if i not in reports and keys[i] in cache)
    assert CONFIG.full or pending == 0
    if pending:
        RECORD.mark_unavailable(SUITE, f"{pending} of {len(pairs)} configs", "AOT figures",
                                f"pending: not compiled within this run's {BUDGET_S} s budget; the next "
                                f"`pytest bench/ --benchmark` continues from bench/results/aot_cache.json")
    failed = [r for r in rows if r["status"] != "ok"]
    spilled = [r for r in rows if r["status"] == "ok" and r["spills (st/ld B)"] != "0/0"]
    per_file = {}
    for r in rows:
        per_file.setdefault((r["file"], r["arch"]), []).append(r)
    readme_rows = [{"file": f, "arch": a, "configs": len(rs), "failed": sum(r["status"] != "ok" for r in rs),
                    "with spills": sum(r["status"] == "ok" and r["spills (st/ld B)"] != "0/0" for r in rs),
                    "max registers": max(r["registers"] for r in rs),
                    "max shared B": max(r["shared B"] for r in rs),
                    "with tensor cores": sum(r["tensor cores"] == "yes" for r in rs)}
                   for (f, a), rs in sorted(per_file.items())]
    note = (f"{len(rows)} of {len(pairs)} shipped configs ({len(reports)} compiled in this run, "
            f"{len(rows) - len(reports)} reused from bench/results/aot_cache.json for unchanged "
            f"sources, {pending} pending); {len(failed)} failed to compile, {len(spilled)} spill "
            f"registers" + ("" if CONFIG.full else "; smoke run: one config per file, sm_80"))
    RECORD.add_report("Static kernel report (AOT, ptxas -v)", rows, note, readme_rows=readme_rows)
