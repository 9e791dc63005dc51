"""Regenerate the performance pages under docs/ from the saved benchmark JSON files.

    python scripts/perf_report.py [--json bench/results/latest.json]
                                  [--gpu-json bench/results/gpu-*.json ...] [--docs docs] [--check]

Two pages hold generated regions: ``docs/performance.md`` the CPU run of
``pytest bench/ --benchmark`` (``--json``) between ``<!-- perf:start -->`` and ``<!-- perf:end -->``,
and ``docs/gpu.md`` the latest run on each kind of GPU machine (``--gpu-json``, default every
``bench/results/gpu-*.json``, saved from ``scripts/gpu_session.sh bench``; optional), one section per
run, between ``<!-- perf-gpu:start -->`` and ``<!-- perf-gpu:end -->``. A side table of a GPU run
that is identical to the same table of an earlier run on the page is not repeated: it points to
that run instead. Everything outside the markers (the pages' prose) is left untouched. If a page or
its markers are absent, that section is printed to stdout instead (and the script says so on
stderr). ``--check`` exits 1 when a section differs from what its JSON gives (``make test`` runs it:
the published tables never drift from the measurements). The tables are formatted by
``bench/perf_summary.py``, the module that prints the summary at the end of
``pytest bench/ --benchmark``, so both agree.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import perf_summary  # noqa: E402

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
GPU_START, GPU_END = "<!-- perf-gpu:start -->", "<!-- perf-gpu:end -->"
#: the title of docs/gpu.md, which the CPU page points to
GPU_TITLE = "GPU measurements"
CPU_PAGE, GPU_PAGE = "performance.md", "gpu.md"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render(data: dict, source: str, heading: bool = False, gpu_section: str = "") -> str:
    """A section body (without the markers; the page has its title above them, so a title is only
    added when the section is printed on its own)."""
    return perf_summary.format_markdown(data, heading=heading, source=source, gpu_section=gpu_section)


def _subsections(body: str) -> tuple[str, list[tuple[str, str]]]:
    """``body`` split at its ``### `` headings: (the text before the first, [(heading, text)])."""
    parts = ("\n" + body).split("\n### ")
    return parts[0][1:], [(part.split("\n", 1)[0], part.split("\n", 1)[1] if "\n" in part else "")
                          for part in parts[1:]]


def render_gpu_runs(runs: list[tuple[dict, str]]) -> str:
    """One section per GPU run, titled by its device and JSON file; a side table identical to the
    same table of an earlier run is replaced by a pointer to that run."""
    seen: dict[tuple[str, str], str] = {}
    sections = []
    for data, source in runs:
        title = f"{perf_summary.run_header(data)['device_name'] or 'GPU'} (`{source}`)"
        preamble, subsections = _subsections(render(data, source))
        lines = [f"## {title}", "", preamble.rstrip("\n")]
        for heading, text in subsections:
            first = seen.setdefault((heading, text), title)
            lines += ["", f"### {heading}", ""]
            lines.append(text.strip("\n") if first == title else f"Same as in the run on {first} above.")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def replace_section(page: str, body: str, start: str = START, end: str = END) -> str | None:
    """``page`` with the marked region replaced by ``body``; None if the markers are missing."""
    first, last = page.find(start), page.find(end)
    if first < 0 or last < 0 or last < first:
        return None
    return page[: first + len(start)] + "\n" + body + page[last:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--gpu-json", type=Path, nargs="*",
                        default=sorted((ROOT / "bench" / "results").glob("gpu-*.json")))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs",
                        help=f"the folder of {CPU_PAGE} and {GPU_PAGE}")
    parser.add_argument("--check", action="store_true",
                        help="do not write: exit 1 if a generated section is out of date")
    args = parser.parse_args(argv)

    if not args.json.exists():
        print(f"{args.json} does not exist: run `pytest bench/ --benchmark` first", file=sys.stderr)
        return 2
    gpu_runs = [(json.loads(path.read_text()), _relative(path)) for path in args.gpu_json if path.exists()]
    sections = [(args.docs / CPU_PAGE, START, END,
                 render(json.loads(args.json.read_text()), _relative(args.json),
                        gpu_section=GPU_TITLE if gpu_runs else ""))]
    if gpu_runs:
        sections.append((args.docs / GPU_PAGE, GPU_START, GPU_END, render_gpu_runs(gpu_runs)))

    status = 0
    for path, start, end, body in sections:
        page = path.read_text() if path.exists() else ""
        updated = replace_section(page, body, start, end)
        if updated is None:
            print(f"{path}: no '{start}' ... '{end}' markers; the section is printed below instead of "
                  f"written", file=sys.stderr)
            sys.stdout.write(body)
            status = 1 if args.check else status
        elif updated == page:
            print(f"{path}: already up to date")
        elif args.check:
            print(f"{path}: a generated section is out of date with its JSON; run "
                  f"python scripts/perf_report.py", file=sys.stderr)
            status = 1
        else:
            path.write_text(updated)
            print(f"{path}: regenerated")
    return status


if __name__ == "__main__":
    sys.exit(main())
