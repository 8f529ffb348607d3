"""`sfedge train`: train a model on the fundus demo data (Frangi pseudo-labels, not clinical labels)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sfedge.commands.model_options import MODEL_HELP, add_model_options, model_options
from sfedge.console import console, print_json, progress_bar

EPILOG = """examples:
  sfedge train unet-sfconv --s 0.25 --steps 800 -o runs/unet-sfconv.safetensors
  sfedge train net.py:make_net --config '{"classes": 3}' --task multiclass --steps 300 -o runs/net.safetensors
  sfedge train monai.networks.nets:BasicUNet --config basicunet.json --steps 300 -o runs/basicunet.safetensors
  sfedge train unet --config '{"widths": [32, 64, 128, 256]}' -o runs/unet-wide.safetensors
  sfedge train unet-sfconv --init runs/unet-sfconv-s0.25.safetensors --steps 200 -o runs/ft.safetensors

Labels are a Frangi vesselness filter on scikit-image's real fundus photograph: pseudo-labels
good enough to compare models on a CPU in minutes, not clinical ground truth.  What a model
learns follows its output: 1 channel (binary) vessels; multiclass 2 classes (background,
vessel) or 3 (outside the field of view, retina, vessel); multilabel 2 labels (vessel,
field of view).  Models with 1 input channel see the green channel, 3 see RGB.

Models with a fixed input size (factorizer: 128x128) train on crops of that size, and their
held-out Dice comes from tiled inference over the whole held-out strip (sfedge.tiling).
The checkpoint is written before the held-out evaluation and again, atomically, with its
Dice after it: if the evaluation fails, a one-line warning says why, the checkpoint stays
(its holdout_dice is null) and the exit status is still 0."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP + " (a checkpoint is fine-tuned)")
    p.add_argument("--s", type=float, help="rank ratio for sfedge's SFConv models (unet-sfconv, factorizer-sfconv)")
    p.add_argument("--init", help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128, help="training crop size (default 128)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--flatness-weight", type=float, default=1e-3, help="lambda of the singular-value flattening term")
    p.add_argument("--flatness-mode", choices=("spectral", "literal"), default="spectral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from sfedge.console import err_console
    from sfedge.models import input_shape
    from sfedge.nn import count_macs, count_params
    from sfedge.source import ModelSource, resolve_model
    from sfedge.train import TrainConfig, demo_preprocessing, save_evaluated, train

    options = model_options(args)
    if args.s is not None:
        options["config"]["s"] = args.s
    torch.manual_seed(args.seed)
    ck = resolve_model(args.init or args.model, **({"task": options["task"]} if args.init else options))
    model, name = ck.model, ck.name
    source = ModelSource.from_checkpoint(ck, (args.crop, args.crop))  # the task, detected if not given
    pre = demo_preprocessing(source.input_shape[1])
    tc = TrainConfig(steps=args.steps, batch=args.batch, crop=args.crop, lr=args.lr,
                     flatness_weight=args.flatness_weight, flatness_mode=args.flatness_mode, seed=args.seed)
    model.train()
    with progress_bar(f"train {name} ({source.task})", total=tc.steps, enabled=not args.json) as bar:
        result = train(model, tc, pre=pre, task=source.task, evaluate=False,
                       progress=lambda s, loss: bar(f"loss {loss:.3f}", s / tc.steps))
    out = Path(args.out)
    metrics = {**{k: v for k, v in ck.metrics.items() if k != "untrained"}, "steps": tc.steps,
               "train_seconds": round(result.seconds, 1), "task": source.task,
               "labels": "Frangi pseudo-labels on skimage.data.retina()"}
    dice, error = save_evaluated(model, out, metrics, pre=pre, task=source.task,
                                 record_factorization=bool(ck.factorized))
    if error:
        err_console.print(f"sfedge train: warning: held-out evaluation failed ({error}); the checkpoint {out} is "
                          "saved without a held-out Dice")
    shape = input_shape(ck.config, (256, 256), model)
    summary = {"checkpoint": str(out), "model": name, "task": source.task, "holdout_dice": dice,
               "params": count_params(model), "macs": count_macs(model, shape), "input_shape": list(shape),
               "seconds": round(result.seconds, 1), "evaluation_error": error}
    if args.json:
        print_json(summary)
    else:
        dice_text = f"held-out Dice {dice:.3f} (vs pseudo-labels)" if dice is not None else "held-out Dice: not evaluated"
        console.print(f"{name} ({source.task}): {dice_text}, {summary['params']:,} params, {result.seconds:.0f} s; "
                      f"wrote {out}")
    return 0
