"""`sfedge calibration`: list calibration sets or show what one resolves to."""

from __future__ import annotations

import argparse

from sfedge.calibration import list_calibrations, load_calibration
from sfedge.console import console, print_json, table

EPILOG = """examples:
  sfedge calibration                        list the sets found (calibration/, $SFEDGE_CALIBRATION)
  sfedge calibration fundus-demo --size 256 256
  sfedge calibration calibration/my-octa.toml --size 512 512 --json

See calibration/README.md for the spec format."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="calibration set name or spec path to load and describe")
    p.add_argument("--size", nargs=2, type=int, default=[256, 256], metavar=("H", "W"), help="model input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not args.spec:
        names = list_calibrations()
        if args.json:
            print_json(names)
        else:
            console.print("\n".join(names))
        return 0
    c = load_calibration(args.spec, tuple(args.size))
    info = {"name": c.name, "sha256": c.sha256, "calibration": list(c.calibration.shape), "holdout": list(c.holdout.shape),
            "preprocessing": c.spec.preprocessing.as_dict(), "source": c.spec.source, "files": c.files,
            "mean": [float(v) for v in c.calibration.mean((0, 2, 3))], "std": [float(v) for v in c.calibration.std((0, 2, 3))]}
    if args.json:
        print_json(info)
        return 0
    rows = [[k, str(v)] for k, v in info.items() if k != "files"] + [["files", f"{len(c.files)} ({', '.join(c.files[:3])}...)"]]
    console.print(table(f"calibration {c.name}", ["key", "value"], rows))
    return 0
