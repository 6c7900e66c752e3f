"""``kvlab report PATH... -o DIR``: one Markdown and one HTML page with plots from result folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from kvlab.cli import UsageError

    inputs = [Path(p) for p in args.inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} exists and is not a directory")
    from kvlab.report import write_report

    try:
        col = write_report(inputs, out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"{col.count()} result files ({len(col.skipped)} skipped) -> {out}/report.md, {out}/report.html", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="Markdown + HTML report with tables and plots from result folders")
    p.add_argument("inputs", nargs="+", help="result folders (searched recursively) or result files")
    p.add_argument("-o", "--output-dir", default="report", help="where report.md, report.html and plots/ go")
    p.set_defaults(func=cmd_report)
