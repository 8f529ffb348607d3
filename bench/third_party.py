"""Third-party models: a user's file and MONAI's nets through train, factorize, build (host-cpu), parity, profile.

For each model: briefly trained on the fundus demo (so masks are not empty), factorized at s=0.25 (truncated
SVD) and fine-tuned with the same number of steps; params and MACs dense vs SFConv at 256x256; host-cpu fp32 and
int8 bundles of both (ONNX Runtime + TFLite), with which artifacts built and their parity; and the paired
SFConv-over-dense speed-up of ONNX Runtime fp32, TFLite fp32 and TFLite int8 in the profiler's paired mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = 200
MODELS = {
    "user net (1 ch, 3 classes)": {"spec": f"{ROOT / 'tests' / 'user_net.py'}:make_net", "task": "multiclass",
                                   "config": {"classes": 3, "width": 16},
                                   "calibration": str(ROOT / "calibration" / "fundus-demo-green.toml")},
    "MONAI BasicUNet": {"spec": "monai.networks.nets:BasicUNet", "task": "binary", "calibration": "fundus-demo",
                        "config": {"spatial_dims": 2, "in_channels": 3, "out_channels": 1,
                                   "features": [16, 16, 32, 64, 128, 16]}},
    "MONAI UNet": {"spec": "monai.networks.nets:UNet", "task": "multiclass", "calibration": "fundus-demo",
                   "config": {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "channels": [16, 32, 64, 128],
                              "strides": [2, 2, 2], "num_res_units": 2}},
}
PAIRS = (("fp32", "onnxruntime"), ("fp32", "tflite"), ("int8", "tflite"))


def _model(label: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    from sfedge.build import build_bundle, factorize_checkpoint
    from sfedge.checkpoint import load_checkpoint, save_checkpoint
    from sfedge.errors import SfedgeError
    from sfedge.nn import count_macs, count_params
    from sfedge.source import ModelSource, resolve_model
    from sfedge.train import TrainConfig, demo_preprocessing, train

    cfg = TrainConfig(steps=STEPS, batch=8, crop=128, lr=3e-3)
    stem = label.split()[1].lower() if label.startswith("MONAI") else "user-net"
    dense_path, sf_path = work / f"{stem}.safetensors", work / f"{stem}-sf.safetensors"
    ck = resolve_model(spec["spec"], config=spec["config"], task=spec["task"])
    source = ModelSource.from_checkpoint(ck, (256, 256))
    pre = demo_preprocessing(source.input_shape[1])
    dense = train(ck.model, cfg, pre=pre, task=spec["task"])
    save_checkpoint(ck.model, dense_path, preprocessing=pre, task=spec["task"], metrics={"holdout_dice": dense.dice})
    _, report = factorize_checkpoint(dense_path, 0.25, sf_path)
    sf = load_checkpoint(sf_path)
    tuned = train(sf.model, cfg, pre=pre, task=spec["task"])
    save_checkpoint(sf.model, sf_path, preprocessing=pre, task=spec["task"], record_factorization=True,
                    metrics={"holdout_dice": tuned.dice})
    shape = source.input_shape
    row: dict[str, Any] = {
        "model": label, "task": spec["task"], "params": [count_params(ck.model), count_params(sf.model)],
        "macs": [count_macs(ck.model, shape), count_macs(sf.model, shape)], "holdout_dice": [dense.dice, tuned.dice],
        "kept_dense": [r.name for r in report.rows if r.rank is None], "bundles": {}, "artifacts": [],
    }
    for precision in ("fp32", "int8"):
        for name, path in (("dense", dense_path), ("sfconv", sf_path)):
            try:
                result = build_bundle(path, "host-cpu", precision, calibration=spec["calibration"],
                                      out_dir=work / "bundles")
            except SfedgeError as e:
                row["artifacts"].append({"model": name, "precision": precision, "error": str(e)})
                continue
            row["bundles"][f"{name} {precision}"] = str(result.path)
            for a in result.bundle.manifest["artifacts"]:
                row["artifacts"].append({"model": name, "precision": precision, "backend": a["backend"],
                                         "parity": a["parity"], "float_layers": len(a["float_layers"])})
            for f in result.failures:
                row["artifacts"].append({"model": name, "precision": precision, **f})
    return row


def _speedups(rows: list[dict[str, Any]]) -> None:
    from sfedge.profile.schedule import measure_pair
    from sfedge.profile.subjects import subjects_from
    from sfedge.profile.types import MeasureConfig

    config = MeasureConfig(runs=60, min_seconds=1.5, warmup_runs=3)
    for row in rows:
        row["speedup"] = {}
        for precision, backend in PAIRS:
            sf, dense = row["bundles"].get(f"sfconv {precision}"), row["bundles"].get(f"dense {precision}")
            if not sf or not dense:
                continue
            try:
                a, b = subjects_from(sf, backend)[0], subjects_from(dense, backend)[0]
            except Exception:  # that backend's artifact failed to build: the table says so
                continue
            _, _, pairing = measure_pair(a, b, config)
            r = pairing.ratio
            row["speedup"][f"{backend} {precision}"] = [r.speedup, r.speedup_low, r.speedup_high]


def run(out: Path) -> str:
    out = Path(out)
    work = out / "third-party"
    work.mkdir(parents=True, exist_ok=True)
    rows = [_model(label, spec, work) for label, spec in MODELS.items()]
    _speedups(rows)
    (out / "third_party.json").write_text(json.dumps(rows, indent=2, default=str))
    md = ["## Third-party models (host-cpu, 256x256)", "",
          f"Each model trained {STEPS} steps on the fundus demo (batch 8, 128x128 crops), factorized at s=0.25 by "
          f"truncated SVD and fine-tuned {STEPS} steps; held-out Dice against the demo's pseudo-labels for the "
          "model's task. Speed-up = dense median / SFConv median in the profiler's paired mode (95% CI).", "",
          "| model | task | params dense / SFConv | GMAC dense / SFConv | held-out Dice dense / SFConv | "
          "ORT fp32 | TFLite fp32 | TFLite int8 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = [f"{v[0]:.2f}x [{v[1]:.2f}, {v[2]:.2f}]" if (v := r["speedup"].get(k)) else "-"
              for k in ("onnxruntime fp32", "tflite fp32", "tflite int8")]
        md.append(f"| {r['model']} | {r['task']} | {r['params'][0]:,} / {r['params'][1]:,} | {r['macs'][0] / 1e9:.2f} / "
                  f"{r['macs'][1] / 1e9:.2f} | {r['holdout_dice'][0]:.3f} / {r['holdout_dice'][1]:.3f} | "
                  + " | ".join(sp) + " |")
    md += ["", "Artifacts built and their parity against their own torch model (held-out crops):", "",
           "| model | conv | precision | backend | parity | layers float |", "|---|---|---|---|---|---|"]
    for r in rows:
        for a in r["artifacts"]:
            if "error" in a:
                md.append(f"| {r['model']} | {a['model']} | {a['precision']} | {a.get('backend', '-')} | "
                          f"not built: {a['error'][:160]} | - |")
                continue
            p = a["parity"]
            mask = f"mask {p['dice_agreement']:.4f}" if p.get("dice_agreement") is not None else "masks not judged"
            md.append(f"| {r['model']} | {a['model']} | {a['precision']} | {a['backend']} | {mask}, cosine "
                      f"{p['cosine']:.5f}, max abs {p['max_abs']:.2g} | {a['float_layers']} |")
    md += ["", "Layers kept dense by factorize (transposed, 1x1 and grouped convs): "
           + "; ".join(f"{r['model']}: {len(r['kept_dense'])}" for r in rows) + "."]
    return "\n".join(md)
