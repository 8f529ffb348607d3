"""`sfedge train`: train a model on the fundus demo data (Frangi pseudo-labels, not clinical labels)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sfedge.console import console, print_json, progress_bar
from sfedge.errors import ConfigError

EPILOG = """examples:
  sfedge train unet-sfconv --s 0.25 --steps 800 -o runs/unet-sfconv.safetensors
  sfedge train unet --config '{"widths": [32, 64, 128, 256]}' -o runs/unet-wide.safetensors
  sfedge train unet-sfconv --init runs/unet-sfconv-s0.25.safetensors --steps 200 -o runs/ft.safetensors

Labels are a Frangi vesselness filter on scikit-image's real fundus photograph: pseudo-labels
good enough to compare models on a CPU in minutes, not clinical ground truth."""


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

    from sfedge.checkpoint import load_checkpoint, save_checkpoint
    from sfedge.models import create_model, input_shape
    from sfedge.nn import count_macs, count_params
    from sfedge.preprocess import FUNDUS_PREPROCESSING
    from sfedge.train import TrainConfig, train

    try:
        cfg = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config is not valid JSON ({e})", "e.g. --config '{\"widths\": [16, 32]}'") from e
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
        result = train(model, tc, progress=lambda s, loss: bar(f"loss {loss:.3f}", s / tc.steps))
    out = Path(args.out)
    save_checkpoint(model, out, preprocessing=FUNDUS_PREPROCESSING,
                    metrics={"holdout_dice": result.dice, "steps": tc.steps, "train_seconds": round(result.seconds, 1),
                             "labels": "Frangi pseudo-labels on skimage.data.retina()"})
    summary = {"checkpoint": str(out), "model": name, "holdout_dice": result.dice, "params": count_params(model),
               "macs_256": count_macs(model, input_shape(model.sfedge_config)),
               "seconds": round(result.seconds, 1)}
    if args.json:
        print_json(summary)
    else:
        console.print(f"{name}: held-out Dice {result.dice:.3f} (vs pseudo-labels), {summary['params']:,} params, "
                      f"{result.seconds:.0f} s; wrote {out}")
    return 0
