"""`sfedge factorize`: a checkpoint's kxk convs to SFConv layers at ratio s (truncated SVD, no retraining)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sfedge.console import console, print_json, table

EPILOG = """examples:
  sfedge factorize runs/unet.safetensors --s 0.25 -o runs/unet-sfconv-s0.25.safetensors
  sfedge factorize runs/unet.safetensors --s 0.5 --json

The new checkpoint rebuilds by name (<family>-sfconv with s in its config).  Each layer
is the best rank-r approximation of the dense conv; fine-tune (sfedge train --init) to
recover accuracy at small s."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an sfedge checkpoint (.safetensors)")
    p.add_argument("--s", type=float, required=True, help="rank ratio: r = max(1, round(s * min(Cin, Cout)))")
    p.add_argument("-o", "--out", help="output checkpoint (default: <input stem>-sfconv-s<S>.safetensors beside it)")
    p.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sfedge.build import factorize_checkpoint

    src = Path(args.checkpoint)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}-sfconv-s{args.s:g}.safetensors")
    path, report = factorize_checkpoint(src, args.s, out)
    if args.json:
        print_json({"checkpoint": str(path), **report.as_dict()})
        return 0
    rows = [[r.name, r.shape, r.rank, r.params_before, r.params_after, r.macs_before, r.macs_after, r.note]
            for r in report.rows]
    console.print(table(f"factorize s={args.s:g}", ["layer", "shape", "rank", "params before", "params after",
                                                    "MACs before", "MACs after", "note"], rows))
    console.print(f"params {report.params_before:,} -> {report.params_after:,}; MACs {report.macs_before / 1e9:.3f} G -> "
                  f"{report.macs_after / 1e9:.3f} G ({report.mac_reduction:.2f}x fewer); wrote {path}")
    return 0
