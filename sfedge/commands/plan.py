"""`sfedge plan`: per layer, dense or SFConv and its rank, chosen from latencies measured on the target."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfedge.commands.model_options import MODEL_HELP, add_model_options, model_options
from sfedge.commands.profile import default_out
from sfedge.console import console, err_console, print_json, progress_bar
from sfedge.errors import ConfigError
from sfedge.fileio import check_output_dir
from sfedge.profile.remote import RemoteOptions
from sfedge.profile.types import MeasureConfig

__all__ = ["register", "run", "parse_numbers"]

EPILOG = """examples:
  sfedge plan unet --target host-cpu --speedup 2
      the demo U-Net on this CPU (ONNX Runtime fp32): latency table, plan, fine-tune, build, profile
  sfedge plan unet --target host-cpu --backend tflite --precision int8 --budget-ms 2,2.5,3
      three plans for TFLite int8, measured with uniform s=0.5 and s=0.25 in one run
  sfedge plan ckpt.safetensors --target raspberry-pi-5 --speedup 2 --remote pi@raspberrypi --install
      the latency table measured on the Pi (the small models are made here, measured there)
  sfedge plan monai.networks.nets:BasicUNet --config cfg.json --weights model.pt --calibration my-set --min-dice 0.95

What it does: measures (or loads from the cache) the latency of every conv
layer's shape on the target, dense and as SFConv at a grid of ranks; measures
how much each layer's output error grows at each rank (--proxy sensitivity)
or how much spectral energy it drops (--proxy energy); chooses per layer the
option of least total error under the budget (exact multiple-choice knapsack;
ranks snapped to what the table shows is fast); fine-tunes the planned model
by distillation from the dense one on calibration images (no labels needed);
then builds it and profiles it with vanilla and uniform-s models in one run.
The plan (per layer: choice, rank, predicted ms, MACs) is in plan.md, in the
checkpoint's metrics and in the bundle manifest (model.plan)."""


def parse_numbers(text: str | None, what: str) -> list[float]:
    """'6,8.5' -> [6.0, 8.5]; a one-line error otherwise (empty or 'none': [])."""
    if not text or text.strip().lower() == "none":
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers", f"e.g. {what} 2,3") from err
    if any(v <= 0 for v in values):
        raise ConfigError(f"{what} values must be positive, got {text!r}", f"e.g. {what} 2,3")
    return values


def register(subparsers: Any, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="the dense (vanilla) model: " + MODEL_HELP)
    p.add_argument("--target", default="host-cpu", help="target name or .toml file (default host-cpu)")
    goal = p.add_argument_group("the goal (at least one; lists give one plan each)")
    goal.add_argument("--budget-ms", help="latency budgets in ms as the table predicts them, e.g. 5,6")
    goal.add_argument("--speedup", help="speed-ups over the dense model as the table predicts them, e.g. 1.5,2")
    goal.add_argument("--min-dice", type=float,
                      help="the fastest plan whose model (truncated, before fine-tuning) keeps mask Dice >= D with "
                           "the dense model on calibration images")
    p.add_argument("--precision", help="precision (default: the target's default)")
    p.add_argument("--backend", help="runtime to plan for (default: the target's first for the precision)")
    p.add_argument("--proxy", choices=("sensitivity", "energy"), default="sensitivity",
                   help="accuracy proxy: measured output error per layer and rank (default) or spectral energy kept")
    p.add_argument("--finetune", type=int, default=None, metavar="STEPS",
                   help="distillation steps for every planned and uniform model (default 300)")
    p.add_argument("--compare-s", default="0.5,0.25",
                   help="uniform s measured with the plans, fine-tuned the same way (default 0.5,0.25; 'none')")
    p.add_argument("--calibration", default="fundus-demo", help="calibration set: distillation images, proxy, builds")
    p.add_argument("--bundles", type=Path, default=Path("bundles"), help="where bundles are built (default bundles/)")
    p.add_argument("--force", action="store_true", help="rebuild bundles even when up to date")
    p.add_argument("--refresh-table", action="store_true", help="measure the latency table again (default: cached)")
    p.add_argument("--no-measure", action="store_true", help="stop after the plans and checkpoints (no builds, no profile)")
    MeasureConfig.add_arguments(p)
    r = p.add_argument_group("latency table on a remote device (plain ssh/scp, as sfedge profile --remote)")
    r.add_argument("--remote", action="append", default=[], metavar="USER@HOST",
                   help="measure the latency table on this SSH host (the small models are made here)")
    r.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="ssh/scp -o KEY=VALUE")
    r.add_argument("--ssh-config", help="ssh_config file to use (ssh -F)")
    r.add_argument("--remote-python", default="python3", help="Python on the remote that has sfedge (default python3)")
    r.add_argument("--install", action="store_true", help="install sfedge and the runtime there if missing")
    p.add_argument("-o", "--out", type=Path, help="report folder (default: reports/plan-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of tables")
    add_model_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sfedge.plan import OUTPUT_KIND, PLAN_TRAIN, plan
    from sfedge.profile.latency_table import TABLE_MEASURE

    budgets, speedups = parse_numbers(args.budget_ms, "--budget-ms"), parse_numbers(args.speedup, "--speedup")
    compare = parse_numbers(args.compare_s, "--compare-s")
    if any(s > 1 for s in compare):
        raise ConfigError(f"--compare-s values must be in (0, 1], got {args.compare_s!r}", "e.g. --compare-s 0.5,0.25")
    config = MeasureConfig.from_args(args)
    remote_options = RemoteOptions(ssh_options=list(args.ssh_option), ssh_config=args.ssh_config,
                                   python=args.remote_python, install=args.install)
    options = model_options(args)
    out = args.out or default_out("plan")
    check_output_dir(out, OUTPUT_KIND)  # before the table, the training and the builds, not after
    with progress_bar("plan", enabled=not args.json) as progress:
        result = plan(args.model, args.target, budgets_ms=budgets, speedups=speedups, min_dice=args.min_dice,
                      precision=args.precision, backend=args.backend, proxy=args.proxy,
                      finetune_steps=PLAN_TRAIN.steps if args.finetune is None else args.finetune,
                      compare_s=compare, calibration=args.calibration, bundles_dir=args.bundles, config=config,
                      table_config=replace(TABLE_MEASURE, threads=config.threads), remote=args.remote,
                      remote_options=remote_options, refresh_table=args.refresh_table, measure=not args.no_measure,
                      force=args.force, model_config=options["config"], weights=options["weights"],
                      task=options["task"], progress=progress)
    result.write(out, plots=not args.no_plots)
    if args.json:
        print_json({**{k: v for k, v in result.as_dict().items() if k != "table"},
                    "table_stated_error": result.table.stated_error, "out": str(out)})
        return 0
    for t in result.tables():
        console.print(t)
    for row in result.predicted_vs_measured():
        console.print(f"{row['name']}: table predicted {row['predicted_ms']:.3f} ms, measured {row['measured_ms']:.3f} ms "
                      f"({row['error']:+.1%})")
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    console.print(f"report: {out}")
    return 0
