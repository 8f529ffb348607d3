"""`sfedge train`: train a model on the fundus demo data (Frangi pseudo-labels, not clinical labels)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sfedge.console import console, print_json, progress_bar

EPILOG = """examples:
  sfedge train unet-sfconv --s 0.25 --steps 800 -o runs/unet-sfconv.safetensors
  sfedge train unet --config '{"widths": [32, 64, 128, 256]}' -o runs/unet-wide.safetensors
  sfedge train unet-sfconv --init runs/unet-sfconv-s0.25.safetensors --steps 200 -o runs/ft.safetensors

Labels are a Frangi vesselness filter on scikit-image's real fundus photograph: pseudo-labels
good enough to compare models on a CPU in minutes, not clinical ground truth.

Models with a fixed input size (factorizer: 128x128) train on crops of that size, and their
held-out Dice comes from tiled inference over the whole held-out strip (sfedge.tiling).
The checkpoint is written before the held-out evaluation and again, atomically, with its
Dice after it: if the evaluation fails, a one-line warning says why, the checkpoint stays
(its holdout_dice is null) and the exit status is still 0."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="registry model name (see `sfedge inspect --models`)")
    p.add_argument("--config", default="{}", help="model config as JSON, e.g. '{\"widths\": [16, 32, 64, 128]}'")
    p.add_argument("--s", type=float, help="rank ratio for SFConv models")
    p.add_argument("--init", help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--flatness-weight", type=float, default=1e-3, help="lambda of the singular-value flattening term")
    p.add_argument("--flatness-mode", choices=("spectral", "literal"), default="spectral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from sfedge.checkpoint import load_checkpoint
    from sfedge.console import err_console
    from sfedge.errors import ConfigError
    from sfedge.models import create_model, input_shape
    from sfedge.nn import count_macs, count_params
    from sfedge.train import TrainConfig, save_evaluated, train

    try:
        cfg = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config is not valid JSON ({e})", "e.g. --config '{\"widths\": [16, 32]}'") from None
    if args.s is not None:
        cfg["s"] = args.s
    torch.manual_seed(args.seed)
    if args.init:
        ck = load_checkpoint(args.init)
        model, name = ck.model, ck.name
    else:
        model, name = create_model(args.model, **cfg), args.model
    tc = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, flatness_weight=args.flatness_weight,
                     flatness_mode=args.flatness_mode, seed=args.seed)
    with progress_bar(f"train {name}", total=tc.steps, enabled=not args.json) as bar:
        result = train(model, tc, progress=lambda s, loss: bar(f"loss {loss:.3f}", s / tc.steps), evaluate=False)
    out = Path(args.out)
    dice, error = save_evaluated(model, out, {"steps": tc.steps, "train_seconds": round(result.seconds, 1),
                                              "labels": "Frangi pseudo-labels on skimage.data.retina()"})
    if error:
        err_console.print(f"sfedge train: warning: held-out evaluation failed ({error}); the checkpoint {out} is "
                          "saved without a held-out Dice")
    summary = {"checkpoint": str(out), "model": name, "holdout_dice": dice, "params": count_params(model),
               "macs": count_macs(model, input_shape(model.sfedge_config)),
               "input_shape": list(input_shape(model.sfedge_config)), "seconds": round(result.seconds, 1),
               "evaluation_error": error}
    if args.json:
        print_json(summary)
    else:
        dice_text = f"held-out Dice {dice:.3f} (vs pseudo-labels)" if dice is not None else "held-out Dice: not evaluated"
        console.print(f"{name}: {dice_text}, {summary['params']:,} params, {result.seconds:.0f} s; wrote {out}")
    return 0
