"""The summary of a benchmark run: ratios against the baselines measured in the same run.

Pure Python (no torch): used by ``bench/conftest.py`` to print the table after
``pytest bench/ --benchmark`` and by ``scripts/perf_report.py`` to write the README section from
the saved JSON, so both always show the same numbers.

Each timed record carries ``extra_info`` written by ``benchlib.measure``: ``suite``, ``case``,
``impl``, ``compare`` (a list of ``{"baseline", "metric", "goal"}``), ``work``, ``flops``,
``bytes``, ``tokens``, ``threads``, ``dtype``, ``device`` and, for the CPU attention, ``isa`` (the
ISA path of that row: each path is its own subject, named in ``impl`` and carrying its own goals).
A ratio row pairs a subject with the record of the same suite and case whose ``impl`` is the named
baseline.
"""
from __future__ import annotations

__all__ = ["STATISTIC", "summarize", "format_text", "format_markdown", "run_header",
           "goals_missed"]

#: The timing statistic of every ratio: the minimum over rounds, the figure least disturbed by
#: other processes on a shared machine.
STATISTIC = "min"

_METRIC_LABELS = {
    "speedup": "speed-up",
    "memory": "retained memory",
}


def _metric_label(metric: str, work_unit: str) -> str:
    if metric == "per_work":
        return "bandwidth fraction" if work_unit == "bytes" else f"per {work_unit or 'work'} efficiency"
    return _METRIC_LABELS.get(metric, metric)


def _seconds(record: dict) -> float | None:
    stats = record.get("stats") or {}
    value = stats.get(STATISTIC)
    return float(value) if value else None


def _throughput(info: dict, seconds: float | None) -> str:
    if not seconds:
        return ""
    if info.get("flops"):
        rate = info["flops"] / seconds
        return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    if info.get("bytes"):
        return f"{info['bytes'] / seconds / 1e9:.2f} GB/s"
    if info.get("tokens"):
        return f"{info['tokens'] / seconds:,.0f} tok/s"
    return ""


def _ratio(metric: str, subject: dict, baseline: dict) -> float | None:
    ts, tb = _seconds(subject), _seconds(baseline)
    si, bi = subject["extra_info"], baseline["extra_info"]
    if metric == "speedup":
        return tb / ts if ts and tb else None
    if metric == "per_work":
        if not (ts and tb and si.get("work") and bi.get("work")):
            return None
        return (si["work"] / ts) / (bi["work"] / tb)
    if metric == "memory":
        sb, bb = si.get("retained_bytes"), bi.get("retained_bytes")
        return bb / sb if sb and bb else None
    raise ValueError(f"unknown metric {metric!r}")


def summarize(data: dict) -> list[dict]:
    """One row per (subject, baseline) comparison declared in the records of ``data``; a
    comparison whose baseline was not measured is kept only when it carries a goal."""
    records = [b for b in data.get("benchmarks", []) if "suite" in (b.get("extra_info") or {})]
    by_key = {(b["extra_info"]["suite"], b["extra_info"]["case"], b["extra_info"]["impl"]): b
              for b in records}
    unavailable = {(u["suite"], u["case"], u["impl"]): u["reason"]
                   for u in (data.get("transfusion_fast") or {}).get("unavailable", [])}
    rows = []
    for subject in records:
        info = subject["extra_info"]
        for comparison in info.get("compare") or []:
            key = (info["suite"], info["case"], comparison["baseline"])
            baseline = by_key.get(key)
            goal = comparison.get("goal")
            if baseline is None and goal is None:
                continue    # listed under "not measured" with its reason; no goal hangs on it
            ratio = _ratio(comparison["metric"], subject, baseline) if baseline else None
            if baseline is None:
                note = f"baseline not measured: {unavailable.get(key, 'not run')}"
            else:
                note = ""
            rows.append({
                "suite": info["suite"], "case": info["case"], "impl": info["impl"],
                "baseline": comparison["baseline"], "metric": comparison["metric"],
                "metric_label": _metric_label(comparison["metric"], info.get("work_unit", "")),
                "subject_s": _seconds(subject), "baseline_s": _seconds(baseline) if baseline else None,
                "ratio": ratio, "goal": goal,
                "met": None if goal is None or ratio is None else bool(ratio >= goal),
                "isa": info.get("isa"),
                "threads": info.get("threads"), "dtype": info.get("dtype"),
                "device": info.get("device"),
                "throughput": _throughput(info, _seconds(subject)),
                "note": note,
            })
    return rows


def goals_missed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["met"] is False]


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x"


def _fmt_goal(row: dict) -> str:
    if row["goal"] is None:
        return ""
    mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
    return f">= {row['goal']:g}x {mark}"


_COLUMNS = ("suite", "case", "ours", "baseline", "metric", "ours time", "baseline time", "ratio",
            "goal", "thr", "dtype", "ours throughput")


def _cells(row: dict) -> list[str]:
    return [row["suite"], row["case"], row["impl"], row["baseline"], row["metric_label"],
            _fmt_time(row["subject_s"]), _fmt_time(row["baseline_s"]), _fmt_ratio(row["ratio"]),
            _fmt_goal(row) or (row["note"] and "-"), str(row["threads"]), str(row["dtype"]),
            row["throughput"]]


def run_header(data: dict) -> dict:
    """Machine, versions, command and honest state of a saved run."""
    extra = data.get("transfusion_fast") or {}
    env = extra.get("environment") or {}
    records = [b for b in data.get("benchmarks", []) if "suite" in (b.get("extra_info") or {})]
    devices = sorted({b["extra_info"].get("device") for b in records} - {None})
    commit = data.get("commit_info") or {}
    return {
        "command": extra.get("command", "pytest bench/ --benchmark"),
        "datetime": data.get("datetime", ""),
        "device_name": env.get("device_name", ""),
        "devices": devices,
        "torch": env.get("torch", ""),
        "triton": env.get("triton", ""),
        "cpu_count": env.get("cpu_count"),
        "commit": (commit.get("id") or "")[:10] + (" (dirty tree)" if commit.get("dirty") else ""),
        "num_records": len(records),
        "statistic": extra.get("statistic", STATISTIC),
        "gpu_figures": "cuda" in devices,
    }


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _report_tables(data: dict, condensed: bool = False):
    """(title, note, header, rows) of the non-timing reports, in a stable order; ``condensed``
    uses a report's ``readme_rows`` where it has them."""
    reports = ((data.get("transfusion_fast") or {}).get("reports") or {})
    for title in sorted(reports):
        report = reports[title]
        rows = report.get("rows") or []
        if condensed and report.get("readme_rows") is not None:
            rows = report["readme_rows"]
            title = f"{title} (condensed; every row is in bench/results/latest.json)"
        header = []
        for r in rows:
            header += [k for k in r if k not in header]
        yield title, report.get("note", ""), header, [[_cell(r.get(k)) for k in header] for r in rows]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _unavailable_rows(data: dict) -> list[list[str]]:
    """One row per (suite, impl, reason), listing the cases it applies to."""
    entries = (data.get("transfusion_fast") or {}).get("unavailable") or []
    grouped: dict = {}
    for u in entries:
        reason = u["reason"] if len(u["reason"]) <= 240 else u["reason"][:237] + "..."
        grouped.setdefault((u["suite"], u["impl"], reason), []).append(u["case"])
    return [[suite, impl, "; ".join(cases), reason] for (suite, impl, reason), cases in grouped.items()]


def format_text(data: dict) -> str:
    """The terminal summary: the ratio table, then unavailable implementations and side reports."""
    rows = summarize(data)
    head = run_header(data)
    parts = [f"transfusion_fast benchmark summary ({head['command']}; {head['device_name']}; "
             f"torch {head['torch']}, triton {head['triton']}; ratios of the {head['statistic']} "
             f"time over rounds, measured in this run)",
             _text_table(list(_COLUMNS), [_cells(r) for r in rows]) if rows else "(no ratios)"]
    missed = goals_missed(rows)
    if missed:
        parts.append("Goals missed: " + "; ".join(
            f"{r['suite']} {r['case']} {r['impl']} vs {r['baseline']} {r['metric_label']} "
            f"{_fmt_ratio(r['ratio'])} < {r['goal']:g}x" for r in missed))
    unavailable = _unavailable_rows(data)
    if unavailable:
        parts.append("Not measured on this platform:\n" + _text_table(
            ["suite", "impl", "cases", "reason"], unavailable))
    for title, note, header, table in _report_tables(data):
        parts.append(f"{title}" + (f" — {note}" if note else "") + "\n" + _text_table(header, table))
    return "\n\n".join(parts)


def format_markdown(data: dict, heading: bool = True, source: str = "bench/results/latest.json",
                    gpu_section: str = "") -> str:
    """The README "Performance" section (without the marker lines); ``heading=False`` leaves out
    the ``## Performance`` title (when the README already has it above the markers). ``source``:
    the JSON the section is generated from; ``gpu_section``: for a CPU run, the title of the
    README section that holds the GPU figures (empty: none exist)."""
    rows = summarize(data)
    head = run_header(data)
    cpu = ("**All figures in this section are CPU measurements** (" + head["device_name"]
           + (f", {head['cpu_count']} cores" if head["cpu_count"] else "") + ", no GPU): "
           "the Triton kernels are not timed on CPU (they only run under the interpreter there). ")
    state = ("Every figure in this section was measured on " + head["device_name"] + "."
             if head["gpu_figures"] else
             cpu + (f"GPU figures (TFLOP/s over visible elements, GB/s) are under *{gpu_section}*."
                    if gpu_section else
                    "**No GPU figures exist yet**: on a CUDA machine the same command times the "
                    "kernels and reports TFLOP/s over visible elements and GB/s for memory-bound ops."))
    lines = (["## Performance", ""] if heading else []) + [
        f"Produced by `{head['command']}` on {head['device_name']} "
        f"(torch {head['torch']}, triton {head['triton']}), {head['datetime'][:19].replace('T', ' ')} UTC"
        + (f", commit {head['commit']}" if head["commit"] else "") + ".",
        f"Regenerate this section from `{source}` with `python scripts/perf_report.py`.",
        "",
        state,
        "",
        f"Ratios compare our implementation with baselines timed in the same run ({head['statistic']} "
        "over rounds; speed-up = baseline time / our time; per-visible-element efficiency = our "
        "visible elements per second / the baseline's; bandwidth fraction = our bytes moved per "
        "second / those of a plain copy).",
        "",
        _md_table(list(_COLUMNS), [_cells(r) for r in rows]) if rows else "(no ratios in this run)",
    ]
    missed = goals_missed(rows)
    if missed:
        lines += ["", "**Goals missed:** " + "; ".join(
            f"{r['suite']} `{r['case']}` {r['impl']} vs {r['baseline']} ({r['metric_label']}): "
            f"{_fmt_ratio(r['ratio'])}, goal {r['goal']:g}x" for r in missed) + "."]
    unavailable = _unavailable_rows(data)
    if unavailable:
        lines += ["", "### Not measured on this platform", "",
                  _md_table(["suite", "impl", "cases", "reason"], unavailable)]
    for title, note, header, table in _report_tables(data, condensed=True):
        lines += ["", f"### {title}", ""] + ([note, ""] if note else []) + [_md_table(header, table)]
    return "\n".join(lines) + "\n"
