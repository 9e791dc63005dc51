"""Regenerate the README "Performance" sections from the saved benchmark JSON files.

    python scripts/perf_report.py [--json bench/results/latest.json]
                                  [--gpu-json bench/results/gpu-*.json ...] [--readme README.md] [--check]

Two regions of the README are generated: the CPU run of ``pytest bench/ --benchmark`` (``--json``)
between ``<!-- perf:start -->`` and ``<!-- perf:end -->``, and the latest run on each kind of GPU
machine (``--gpu-json``, default every ``bench/results/gpu-*.json``, saved from
``scripts/gpu_session.sh bench``; optional), one after the other, between
``<!-- perf-gpu:start -->`` and ``<!-- perf-gpu:end -->``. Everything else is left untouched. If a
region's markers are absent, that section is printed to stdout instead (and the script says so on
stderr). ``--check`` exits 1 when a section differs from what its JSON gives (for CI: the published
tables never drift from the measurements). The tables are formatted by ``bench/perf_summary.py``,
the module that prints the summary at the end of ``pytest bench/ --benchmark``, so both agree.
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
GPU_TITLE = "GPU measurements"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render(data: dict, source: str, heading: bool = False, gpu_section: str = "") -> str:
    """A section body (without the markers; the README has the titles above them, so a title is
    only added when the section is printed on its own)."""
    return perf_summary.format_markdown(data, heading=heading, source=source, gpu_section=gpu_section)


def replace_section(readme: str, body: str, start: str = START, end: str = END) -> str | None:
    """``readme`` with the marked region replaced by ``body``; None if the markers are missing."""
    first, last = readme.find(start), readme.find(end)
    if first < 0 or last < 0 or last < first:
        return None
    return readme[: first + len(start)] + "\n" + body + readme[last:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--gpu-json", type=Path, nargs="*",
                        default=sorted((ROOT / "bench" / "results").glob("gpu-*.json")))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true",
                        help="do not write: exit 1 if a README section is out of date")
    args = parser.parse_args(argv)

    if not args.json.exists():
        print(f"{args.json} does not exist: run `pytest bench/ --benchmark` first", file=sys.stderr)
        return 2
    gpu = [render(json.loads(path.read_text()), _relative(path))
           for path in args.gpu_json if path.exists()]
    sections = [(START, END, render(json.loads(args.json.read_text()), _relative(args.json),
                                    gpu_section=GPU_TITLE if gpu else ""))]
    if gpu:
        sections.append((GPU_START, GPU_END, "\n".join(gpu)))

    readme = args.readme.read_text() if args.readme.exists() else ""
    updated, status = readme, 0
    for start, end, body in sections:
        replaced = replace_section(updated, body, start, end)
        if replaced is None:
            print(f"{args.readme}: no '{start}' ... '{end}' markers; the section is printed below "
                  f"instead of written", file=sys.stderr)
            sys.stdout.write(body)
            status = 1 if args.check else status
            continue
        updated = replaced
    if args.check:
        if updated != readme:
            print(f"{args.readme}: a Performance section is out of date with its JSON; run "
                  f"python scripts/perf_report.py", file=sys.stderr)
            return 1
        return status
    if updated != readme:
        args.readme.write_text(updated)
        print(f"{args.readme}: Performance sections regenerated")
    else:
        print(f"{args.readme}: Performance sections already up to date")
    return status


if __name__ == "__main__":
    sys.exit(main())
