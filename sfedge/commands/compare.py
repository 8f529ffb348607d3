"""`sfedge compare`: several devices' profile reports in one table and one figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfedge.console import console, print_json
from sfedge.fileio import check_output_dir
from sfedge.profile.compare import OUTPUT_KIND, compare_reports

__all__ = ["register", "run"]

EPILOG = """examples:
  sfedge compare reports/pi5 reports/orin-nano reports/host
  sfedge compare reports/remote/*/ -o reports/all-devices --json

Each REPORT is a folder written by `sfedge profile -o` (or its report.json).
Rows are paired speedups (with their confidence intervals) and median
latencies; columns are devices."""


def register(subparsers: Any, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="REPORT", help="profile report folders (or report.json files)")
    p.add_argument("-o", "--out", type=Path,
                   help="write compare.json/.csv/.md/.png here; an existing folder is replaced only if it holds an "
                        "earlier sfedge comparison, any other non-empty folder is refused")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figure")
    p.add_argument("--json", action="store_true", help="print the merged rows as JSON on stdout")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_dir(args.out, OUTPUT_KIND)
    comparison = compare_reports(args.reports)
    if args.out:
        comparison.write(args.out, plots=not args.no_plots)
    if args.json:
        print_json({**comparison.as_dict(), "out": str(args.out) if args.out else None})
        return 0
    for t in comparison.tables():
        console.print(t)
    if args.out:
        console.print(f"written: {args.out}")
    return 0
