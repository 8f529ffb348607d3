"""`sfedge factorize`: a model's kxk convs to SFConv layers at ratio s (truncated SVD, no retraining)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sfedge.commands.model_options import MODEL_HELP, add_model_options, model_options
from sfedge.console import console, print_json, table

EPILOG = """examples:
  sfedge factorize runs/unet.safetensors --s 0.25 -o runs/unet-sfconv-s0.25.safetensors
  sfedge factorize net.py:make_net --config '{"classes": 3}' --weights net.pt --s 0.25 -o net-sf.safetensors
  sfedge factorize monai.networks.nets:BasicUNet --config basicunet.json --weights model.pt --s 0.25 \\
      --skip 'conv_0.*' -o basicunet-sf.safetensors

The new checkpoint rebuilds alone: sfedge's own families become <family>-sfconv with s in
their config; any other model keeps its source (the spec, its config and the file's hash or
the package's version) and the checkpoint records the rank of each factorized layer.  Each
layer is the best rank-r approximation of the dense conv; fine-tune (sfedge train --init)
to recover accuracy at small s.  Transposed, 1x1 and grouped convs stay dense (listed).
A torch.export program (.pt2) cannot be factorized: factorize its code, then export."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--s", type=float, required=True, help="rank ratio: r = max(1, round(s * min(Cin, Cout)))")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="keep layers whose name matches this glob dense (repeatable), e.g. 'encoder.0.*'")
    p.add_argument("--input-size", nargs=2, type=int, default=[256, 256], metavar=("H", "W"),
                   help="input size for the MAC counts (default 256 256)")
    p.add_argument("-o", "--out", help="output checkpoint (default: <input stem>-sfconv-s<S>.safetensors beside it, "
                                       "or in the working folder for a spec)")
    p.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    add_model_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sfedge.build import factorize_checkpoint

    src = Path(args.model)
    if args.out:
        out = Path(args.out)
    elif src.suffix == ".safetensors":
        out = src.with_name(f"{src.stem}-sfconv-s{args.s:g}.safetensors")
    else:
        out = Path(f"{args.model.rpartition(':')[2] or src.stem}-sfconv-s{args.s:g}.safetensors")
    path, report = factorize_checkpoint(args.model, args.s, out, skip=args.skip, input_size=args.input_size,
                                        **model_options(args))
    if args.json:
        print_json({"checkpoint": str(path), **report.as_dict()})
        return 0
    rows = [[r.name, r.shape, r.rank, r.params_before, r.params_after, r.macs_before, r.macs_after, r.note]
            for r in report.rows]
    console.print(table(f"factorize s={args.s:g}", ["layer", "shape", "rank", "params before", "params after",
                                                    "MACs before", "MACs after", "note"], rows))
    reduction = f" ({report.mac_reduction:.2f}x fewer)" if report.mac_reduction else ""
    console.print(f"params {report.params_before:,} -> {report.params_after:,}; MACs {report.macs_before / 1e9:.3f} G -> "
                  f"{report.macs_after / 1e9:.3f} G{reduction}; wrote {path}")
    return 0
