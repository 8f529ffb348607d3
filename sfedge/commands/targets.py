"""`sfedge targets`: the known targets and their device facts."""

from __future__ import annotations

import argparse

from sfedge.console import console, print_json, table
from sfedge.targets import list_targets, load_target

EPILOG = """examples:
  sfedge targets                         list every target found
  sfedge targets jetson-orin-nano        one target in full
  sfedge targets my-board.toml           validate your own target file

Targets are looked up in $SFEDGE_TARGETS, ./targets and the repository's targets/ folder;
drop a TOML file there (or pass its path anywhere a target is expected) to add one."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="show (and validate) one target by name or path")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
    return p


def _facts(t) -> str:
    d = t.device
    if "tensorrt" in t.backends:
        return f"TensorRT {d.get('tensorrt')}, SM {d.get('sm')}, JetPack {d.get('jetpack', '-')}"
    return f"{d.get('arch', '?')}, {d.get('cores', '?')} cores" + (", fp16 arithmetic" if d.get("fp16_arithmetic") else "")


def run(args: argparse.Namespace) -> int:
    if args.target:
        t = load_target(args.target)
        if args.json:
            print_json(t.as_dict())
            return 0
        rows = [[k, ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
                for k, v in t.as_dict().items() if k not in ("tolerances", "device")]
        rows += [[f"device.{k}", str(v)] for k, v in t.device.items()]
        rows += [[f"tolerances.{p}", ", ".join(f"{k} {v:g}" for k, v in tol.items())] for p, tol in t.as_dict()["tolerances"].items()]
        console.print(table(f"target {t.name}", ["key", "value"], rows))
        return 0
    targets = list_targets()
    if args.json:
        print_json([t.as_dict() for t in targets])
        return 0
    rows = [[t.name, "+".join(t.backends), ", ".join(t.precisions), t.default_precision, t.layout, t.threads,
             f"{t.input_size[0]}x{t.input_size[1]}", _facts(t)] for t in targets]
    console.print(table("targets", ["name", "backend", "precisions", "default", "layout", "threads", "input", "device"], rows))
    return 0
