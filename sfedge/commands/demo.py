"""`sfedge demo`: the whole pipeline on this machine, from real fundus images to a profile report.

1. train (or load) the demo pair: a small vanilla U-Net and its SFConv (s=0.25) twin
   (``--family factorizer``: the Factorizer and its SFConv twin, same training budget);
2. build their host-cpu bundles (fp32 and int8; ONNX Runtime and TFLite), and the
   device-ready folders for one Jetson and one phone target;
3. profile SFConv vs vanilla on this CPU, paired, and write the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sfedge.commands.build import bundles_table
from sfedge.console import console, err_console, fmt_bytes, print_json, progress_bar, table
from sfedge.profile.report import Report
from sfedge.profile.schedule import profile_subjects
from sfedge.profile.subjects import pair_up, subjects_from
from sfedge.profile.types import MeasureConfig
from sfedge.progress import scaled

EPILOG = """examples:
  sfedge demo                      everything, into ./runs/demo
  sfedge demo --no-profile         train and build only
  sfedge demo -o /tmp/demo --json
  sfedge demo --family factorizer  the Factorizer pair (128x128 input, NMF kept fp32 in int8 bundles)

Trained checkpoints are cached in .cache/demo (or $SFEDGE_CACHE/demo); bundles whose
inputs did not change are reused, so a second run takes seconds."""

HOST_PRECISIONS = ("fp32", "int8")
DEVICE_TARGETS = (("jetson-orin-nano", "int8"), ("android-arm64", "int8"))


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="runs/demo", help="folder for bundles and reports (default runs/demo)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiling step")
    p.add_argument("--no-devices", action="store_true", help="skip the Jetson and phone bundles")
    p.add_argument("--family", choices=("unet", "factorizer"), default="unet",
                   help="which demo pair: the U-Nets (default) or the Factorizers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sfedge.build import build_bundle
    from sfedge.checkpoint import load_checkpoint
    from sfedge.demo import DEMO_FAMILIES, DEMO_TRAIN, demo_checkpoints
    from sfedge.errors import ParityError
    from sfedge.models import input_shape
    from sfedge.nn import count_macs, count_params

    out = Path(args.out)
    quiet = args.json
    names = list(DEMO_FAMILIES[args.family])
    total = len(names) * DEMO_TRAIN.steps
    with progress_bar("demo models", total=total, enabled=not quiet) as bar:
        ckpts = demo_checkpoints(family=args.family,
                                 progress=lambda n, s, loss: bar(f"train {n}: loss {loss:.3f}",
                                                                 (names.index(n) * DEMO_TRAIN.steps + s) / total))
    models = []
    for name, path in ckpts.items():
        ck = load_checkpoint(path)
        shape = input_shape(ck.config)
        models.append({"model": name, "checkpoint": str(path), "s": ck.config.get("s") if ck.config.get("conv") == "sfconv" else None,
                       "holdout_dice": ck.metrics.get("holdout_dice"), "params": count_params(ck.model),
                       "input_shape": list(shape), "macs": count_macs(ck.model, shape), "file_size": path.stat().st_size})
    if not quiet:
        console.print(table("demo models (fundus, Frangi pseudo-labels; Dice on the held-out right 30% of the photograph)",
                            ["model", "s", "held-out Dice", "params", "input", "GMAC per input", "checkpoint"],
                            [[m["model"], m["s"], m["holdout_dice"], f"{m['params']:,}",
                              "x".join(map(str, m["input_shape"][2:])), m["macs"] / 1e9, fmt_bytes(m["file_size"])]
                             for m in models]))
    jobs = [(n, "host-cpu", p) for n in ckpts for p in HOST_PRECISIONS]
    if not args.no_devices:
        jobs += [(n, t, p) for n in ckpts for t, p in DEVICE_TARGETS]
    results, failures = [], []
    with progress_bar("bundles", total=len(jobs), enabled=not quiet) as bar:
        for i, (n, t, p) in enumerate(jobs):
            sub = scaled(bar, i / len(jobs), 1 / len(jobs), f"{n} {t} {p}")
            try:
                results.append(build_bundle(ckpts[n], t, p, out_dir=out / "bundles", progress=sub))
            except ParityError as e:  # one artifact missing its gate does not void the other bundles: report it
                failures.append({"model": n, "target": t, "precision": p, "error": str(e)})
    if not quiet:
        console.print(bundles_table("bundles built", results))
        for f in failures:
            err_console.print(f"[red]not built:[/] {f['model']} {f['target']} {f['precision']}: {f['error']}")
    summary = {"family": args.family, "models": models, "bundles": [r.summary() for r in results], "failures": failures}
    if not args.no_profile:
        summary["profile"] = _profile(results, out / "report", quiet, names)
    if quiet:
        print_json(summary)
    return 1 if failures else 0


def _profile(results: list, report_dir: Path, quiet: bool, names: list[str]) -> dict:
    """Paired SFConv-vs-vanilla profile of the host-cpu bundles: every artifact (ONNX Runtime, TFLite), every precision."""
    vanilla, sfconv = names
    host = {(r.bundle.model_name, r.bundle.precision): r.path for r in results if r.bundle.target_name == "host-cpu"}
    pairs = []
    for p in HOST_PRECISIONS:
        if (sfconv, p) in host and (vanilla, p) in host:
            pairs += pair_up(subjects_from(host[(sfconv, p)]), subjects_from(host[(vanilla, p)]))
    config = MeasureConfig()
    with progress_bar("profile (SFConv vs vanilla, paired)", enabled=not quiet) as bar:
        measurements, pairings = profile_subjects([], pairs, config, bar)
    report = Report.create(measurements, pairings, config)
    report.write(report_dir, plots=True)
    if not quiet:
        for t in report.tables():
            console.print(t)
        for note in report.notes:
            err_console.print(f"[yellow]note:[/] {note}")
        console.print(f"profile report (JSON, CSV, Markdown, PNG): {report_dir}")
    return {"report": str(report_dir), "pairs": report.pair_rows()}
