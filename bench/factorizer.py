"""Factorizer section of `make bench`: the second model family trained, deployed and profiled like the U-Nets.

* The demo Factorizer pair (``factorizer`` vs ``factorizer-sfconv``, s=0.25; 16-32-64-128, 128x128 input,
  rank-1 HALS NMF with K=5 in 8x8 windows) trained with the U-Nets' budget; held-out Dice through tiled
  inference over the held-out strip, params and MACs, beside the demo U-Nets.
* Bundles for host-cpu (fp32, int8), android-arm64 (int8) and jetson-orin-nano (int8): parity per artifact
  on the held-out crops and on a whole held-out image (tiled), and what stays float.  A bundle that misses
  its gate is reported with the figure it reached, not dropped silently.
* Paired profiles on this CPU: factorizer-sfconv vs factorizer, and the Factorizer vs the U-Net of
  similar Dice at the same 128x128 window (the U-Nets are fully convolutional, so they are built at the
  Factorizer's window size for a like-for-like time per window, hence per pixel).

    python bench/factorizer.py --out reports/bench     (or: make bench)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HOST = (("host-cpu", "fp32"), ("host-cpu", "int8"))
DEVICES = (("android-arm64", "int8"), ("jetson-orin-nano", "int8"))
WINDOW_TARGET = """name = "host-cpu-128"
description = "host-cpu at the Factorizer's 128x128 window (U-Nets built at the same size for a paired profile)"
backend = ["onnxruntime", "tflite"]
precisions = ["fp32", "int8"]
default_precision = "fp32"
layout = "NCHW"
threads = 2
input_size = [128, 128]
[tolerances.fp32]
max_abs = 1e-4
cosine = 0.99999
[tolerances.int8]
dice_agreement = 0.98
[device]
arch = "x86_64"
cores = 2
"""


def _models(ckpts: dict[str, Path]) -> list[dict]:
    from sfedge.checkpoint import load_checkpoint
    from sfedge.models import input_shape
    from sfedge.nn import count_macs, count_params

    rows = []
    for name, path in ckpts.items():
        ck = load_checkpoint(path)
        shape = input_shape(ck.config)
        macs = count_macs(ck.model, shape)
        rows.append({"model": name, "s": ck.config.get("s") if ck.config.get("conv") == "sfconv" else None,
                     "holdout_dice": ck.metrics.get("holdout_dice"), "params": count_params(ck.model),
                     "input": list(shape[2:]), "macs": macs,
                     "gmac_per_megapixel": macs / (shape[2] * shape[3]) * 1e6 / 1e9,
                     "train_seconds": ck.metrics.get("train_seconds"), "steps": ck.metrics.get("steps")})
    return rows


def _bundles(ckpts: dict[str, Path], bundles_dir: Path) -> tuple[list, list[dict]]:
    from sfedge.build import build_bundle
    from sfedge.errors import SfedgeError

    results, failures = [], []
    for name, path in ckpts.items():
        for target, precision in HOST + DEVICES:
            try:
                results.append(build_bundle(path, target, precision, out_dir=bundles_dir))
            except SfedgeError as e:  # a missed gate is a result: record it with the figure reached
                failures.append({"model": name, "target": target, "precision": precision, "error": str(e)})
    return results, failures


def _artifact_rows(results: list) -> list[dict]:
    from sfedge.whole_image import check_whole_image

    rows = []
    for r in results:
        m = r.bundle.manifest
        whole = {c.backend: c for c in check_whole_image(r.path)} if m.get("whole_image") else {}
        for a in m["artifacts"]:
            w = whole.get(a["backend"])
            nmf = [f for f in a.get("float_layers", []) if "nmf" in f.lower()]
            rows.append({
                "model": m["model"]["name"], "target": m["target"]["name"], "precision": m["precision"],
                "backend": a["backend"], "kind": a["kind"], "input": m["model"]["input_shape"][2:],
                "parity": a.get("parity", {}), "float_layers": a.get("float_layers", []),
                "float_nmf": len(nmf), "float_other": len(a.get("float_layers", [])) - len(nmf),
                "whole_image": {"status": w.status, **w.parity} if w is not None else None,
                "notes": a.get("notes", []),
            })
    return rows


def _profile(results: list, unet_ckpts: dict[str, Path], bundles_dir: Path, out: Path) -> tuple:
    from sfedge.build import build_bundle
    from sfedge.profile.report import Report
    from sfedge.profile.schedule import profile_subjects
    from sfedge.profile.subjects import pair_up, subjects_from
    from sfedge.profile.types import MeasureConfig
    from sfedge.targets import load_target

    host = {(r.bundle.model_name, r.bundle.precision): r.path for r in results if r.bundle.target_name == "host-cpu"}
    (out / "host-cpu-128.toml").write_text(WINDOW_TARGET)
    window_target = load_target(out / "host-cpu-128.toml")
    pairs, notes = [], []
    for precision in ("fp32", "int8"):
        if ("factorizer-sfconv", precision) in host and ("factorizer", precision) in host:
            pairs += pair_up(subjects_from(host[("factorizer-sfconv", precision)]),
                             subjects_from(host[("factorizer", precision)]))
        for fz, unet in (("factorizer", "unet"), ("factorizer-sfconv", "unet-sfconv")):
            if (fz, precision) not in host:
                continue
            try:
                u = build_bundle(unet_ckpts[unet], window_target, precision, out_dir=bundles_dir).path
            except Exception as e:  # report and go on: the other pairs still run
                notes.append(f"{unet} {precision} at 128x128 not built: {e}")
                continue
            base = {s.backend: s for s in subjects_from(u)}
            pairs += [(c, base[c.backend]) for c in subjects_from(host[(fz, precision)]) if c.backend in base]
    config = MeasureConfig(runs=60, min_seconds=1.5, warmup_runs=3, warmup_seconds=0.5)
    measurements, pairings = profile_subjects([], pairs, config)
    report = Report.create(measurements, pairings, config, device="host-cpu", notes=notes)
    report.write(out / "profile-factorizer")
    return report, notes


def run(out: Path) -> str:
    from sfedge.demo import demo_checkpoints

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundles_dir = out / "bundles"
    fz = demo_checkpoints(family="factorizer")
    unets = demo_checkpoints(family="unet")
    models = _models(fz) + _models(unets)
    results, failures = _bundles(fz, bundles_dir)
    artifacts = _artifact_rows(results)
    report, notes = _profile(results, unets, bundles_dir, out)
    pairs = report.pair_rows()
    (out / "factorizer.json").write_text(json.dumps({"models": models, "artifacts": artifacts, "failures": failures,
                                                     "pairs": pairs, "notes": notes}, indent=2, default=str))
    return _markdown(models, artifacts, failures, pairs, report)


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _markdown(models, artifacts, failures, pairs, report) -> str:
    md = [
        "## Factorizer: trained, deployed and profiled like the U-Nets",
        "",
        "Same training budget for all four models (800 AdamW steps, batch 8, 128x128 crops, one-cycle lr 3e-3, "
        "flatness 1e-3). Held-out Dice against the Frangi pseudo-labels on the right 30% of the photograph; the "
        "Factorizer (fixed 128x128 input) is evaluated by tiled inference over the strip (overlap 0.5, Gaussian).",
        "",
        "| model | s | held-out Dice | params | input | GMAC per input | GMAC per megapixel | training s |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {m['model']} | {m['s'] if m['s'] is not None else '-'} | {_f(m['holdout_dice'])} | {m['params']:,} | "
          f"{m['input'][0]}x{m['input'][1]} | {m['macs'] / 1e9:.3f} | {m['gmac_per_megapixel']:.2f} | "
          f"{m['train_seconds']} |" for m in models],
        "",
        "### Bundles: parity per artifact (held-out crops; whole held-out image, tiled) and what stays float",
        "",
        "| model | target | precision | backend | max abs | mask Dice (crops) | mask Dice (whole image) | "
        "float: NMF / other layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in artifacts:
        p, w = a["parity"], a["whole_image"] or {}
        md.append(f"| {a['model']} | {a['target']} | {a['precision']} | {a['backend']} ({a['kind']}) | "
                  f"{_f(p.get('max_abs'), '.3g')} | {_f(p.get('dice_agreement'), '.4f')} | "
                  f"{_f(w.get('dice_agreement'), '.4f')} {w.get('status', '')} | {a['float_nmf']} / {a['float_other']} |")
    for f in failures:
        md.append(f"| {f['model']} | {f['target']} | {f['precision']} | not built | - | - | - | {f['error'][:160]} |")
    md += [
        "",
        "### Paired latency on this CPU (ratio of medians, 95% bootstrap CI)",
        "",
        "| candidate | baseline | backend | precision | candidate ms | baseline ms | speed-up (baseline/candidate) | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['candidate']} | {r['baseline']} | {r['backend']} | {r['precision']} | {r['median_candidate_ms']:.2f} | "
          f"{r['median_baseline_ms']:.2f} | {r['speedup']:.2f}x | [{r['speedup_low']:.2f}, {r['speedup_high']:.2f}] |"
          for r in pairs],
        "",
        "U-Net baselines in the Factorizer-vs-U-Net rows are built at 128x128 (target host-cpu-128), so a ratio "
        "is per window and per pixel alike. Full report: `profile-factorizer/`.",
    ]
    if report.notes:
        md += ["", "Notes:", *[f"- {n}" for n in report.notes]]
    return "\n".join(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args()
    sys.stdout.write(run(args.out) + "\n")
