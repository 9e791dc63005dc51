"""Regenerate the README "Performance" section from the saved benchmark JSON.

    python scripts/perf_report.py [--json bench/results/latest.json] [--readme README.md] [--check]

The section is the region between the lines ``<!-- perf:start -->`` and ``<!-- perf:end -->`` of the
README; everything else is left untouched. If the markers are absent, the section is printed to
stdout instead (and the script says so on stderr). ``--check`` exits 1 when the README section
differs from what the JSON gives (for CI: the published table never drifts from the measurements).
The table itself is formatted by ``bench/perf_summary.py``, the module that prints the summary at
the end of ``pytest bench/ --benchmark``, so both always agree.
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


def render(data: dict, heading: bool = False) -> str:
    """The section body (without the markers; the README has the ``## Performance`` title above
    them, so the title is only added when the section is printed on its own)."""
    return perf_summary.format_markdown(data, heading=heading)


def replace_section(readme: str, body: str) -> str | None:
    """``readme`` with the marked region replaced by ``body``; None if the markers are missing."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return readme[: start + len(START)] + "\n" + body + readme[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true",
                        help="do not write: exit 1 if the README section is out of date")
    args = parser.parse_args(argv)

    if not args.json.exists():
        print(f"{args.json} does not exist: run `pytest bench/ --benchmark` first", file=sys.stderr)
        return 2
    data = json.loads(args.json.read_text())
    body = render(data)
    readme = args.readme.read_text() if args.readme.exists() else ""
    updated = replace_section(readme, body)
    if updated is None:
        print(f"{args.readme}: no '{START}' ... '{END}' markers; the section is printed below "
              f"instead of written", file=sys.stderr)
        sys.stdout.write(render(data, heading=True))
        return 1 if args.check else 0
    if args.check:
        if updated != readme:
            print(f"{args.readme}: the Performance section is out of date with {args.json}; run "
                  f"python scripts/perf_report.py", file=sys.stderr)
            return 1
        return 0
    if updated != readme:
        args.readme.write_text(updated)
        print(f"{args.readme}: Performance section regenerated from {args.json}")
    else:
        print(f"{args.readme}: Performance section already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
