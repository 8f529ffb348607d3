"""`sfedge sweep`: choose the SFConv rank by measured latency on the device, not by MAC counts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfedge.commands.model_options import MODEL_HELP, add_model_options, model_options
from sfedge.commands.profile import default_out
from sfedge.console import console, err_console, print_json, progress_bar
from sfedge.fileio import check_output_dir
from sfedge.profile.types import MeasureConfig

__all__ = ["register", "run"]

EPILOG = """examples:
  sfedge sweep unet --target host-cpu --s 1,0.5,0.25,0.125
      the demo U-Net: factorize at four ranks, build host-cpu bundles, check, profile (ONNX Runtime)
  sfedge sweep runs/unet.safetensors --target host-cpu --s 0.5,0.25 --backend tflite --precision int8
  sfedge sweep ckpt.safetensors --target raspberry-pi-5 --s 0.5,0.25 --runs 100 -o reports/pi-sweep
  sfedge sweep monai.networks.nets:BasicUNet --config basicunet.json --weights model.pt --s 0.5,0.25

Every s becomes an SFConv checkpoint by truncated SVD, a bundle (each artifact
parity-checked against its torch model), and one configuration in a single
rotating measurement with the vanilla bundle (ratios paired, with CIs).  The
report gives the Pareto front of latency against agreement with the vanilla
model (mask Dice) and, for models trained on the fundus demo, held-out Dice.
Profile on another device by copying the bundles there and running
`sfedge profile` (or `--remote`)."""


def register(subparsers: Any, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="the vanilla (dense) model: " + MODEL_HELP)
    p.add_argument("--target", default="host-cpu", help="target name or .toml file (default host-cpu)")
    p.add_argument("--s", dest="s_values", default="1,0.5,0.25,0.125",
                   help="comma-separated ranks s in (0, 1] (default 1,0.5,0.25,0.125)")
    p.add_argument("--precision", help="precision (default: the target's default)")
    p.add_argument("--backend", help="which backend's artifact to profile (default: the target's first for the precision)")
    p.add_argument("--calibration", default="fundus-demo", help="calibration set for builds (default fundus-demo)")
    p.add_argument("--bundles", type=Path, default=Path("bundles"), help="where bundles are built (default bundles/)")
    p.add_argument("--force", action="store_true", help="rebuild bundles even when up to date")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                   help="fine-tune each factorized model this many steps on the fundus demo first (default 0)")
    MeasureConfig.add_arguments(p)
    p.add_argument("-o", "--out", type=Path,
                   help="report folder (default: reports/sweep-<time>); an existing folder is replaced only if it "
                        "holds an earlier sfedge sweep, any other non-empty folder is refused")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--json", action="store_true", help="print the sweep as JSON on stdout instead of a table")
    add_model_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sfedge.sweep import OUTPUT_KIND, parse_s_values, sweep

    s_values = parse_s_values(args.s_values)
    config = MeasureConfig.from_args(args)
    out = args.out or default_out("sweep")
    check_output_dir(out, OUTPUT_KIND)  # before the builds and the profile, not after
    with progress_bar("sweep", enabled=not args.json) as progress:
        result = sweep(args.model, args.target, s_values, precision=args.precision, backend=args.backend,
                       calibration=args.calibration, bundles_dir=args.bundles, config=config, force=args.force,
                       finetune_steps=args.finetune, progress=progress, **_model_kwargs(args))
    result.write(out, plots=not args.no_plots)
    if args.json:
        print_json({**result.as_dict(), "out": str(out)})
        return 0
    for t in result.tables():
        console.print(t)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    console.print(f"report: {out}")
    return 0


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    options = model_options(args)
    return {"model_config": options["config"], "weights": options["weights"], "task": options["task"]}
