"""TFLite on this CPU (XNNPACK, 2 threads): SFConv (s=0.25) vs vanilla U-Net, fp32 / fp16 / int8.

Two pairs, each timed side by side in one rotation of sfedge's profiler (every
file in its own worker process, blocks of inferences alternated A B C C B A ...):

* the trained demo pair (16-32-64-128), built with ``sfedge.backends.tflite.make.make``
  for host-cpu, parity-checked and (int8) mixed precision where needed;
* a 32-64-128-256 pair at 256x256 with *untrained* weights (latency only: its
  parity numbers say only that the conversion is exact, not that a model works).

For each: median latency, the speed-up, the MAC ratio (the speed-up bound) and
the achieved fraction of it, file sizes and parity.  Then, for the big pair,
to see where the fraction falls short: each DoubleConv block timed alone,
dense vs SFConv, against its own MAC ratio, and the rest of the network
(whole minus blocks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 2
RUNS = 50  # timed inferences per file (at least 1 s), after warm-up
PRECISIONS = ("fp32", "fp16", "int8")
BIG_WIDTHS = [32, 64, 128, 256]
UNTRAINED_TARGET = """name = "bench-untrained"
description = "host CPU; parity gated in fp32 only (untrained, latency-only models: reduced precisions are reported, not gated)"
backend = "tflite"
precisions = ["fp32", "fp16", "int8"]
layout = "NHWC"
threads = 2
input_size = [256, 256]
[tolerances.fp32]
max_abs = 1e-4
[tolerances.fp16]
cosine = 0.0
[tolerances.int8]
cosine = 0.0
"""


def _source(model: Any, name: str):
    from sfedge.backends.tflite.convert import contiguous_
    from sfedge.checkpoint import weights_sha256
    from sfedge.source import ModelSource

    model = contiguous_(model.eval())
    return ModelSource(model, name, dict(getattr(model, "sfedge_config", {})), weights_sha256(model.state_dict()),
                       (1, 3, 256, 256))


def interleaved(paths: dict[str, Path], samples: Any, work: Path, threads: int = THREADS) -> dict[str, dict[str, float]]:
    """Median latency (ms) of each file, measured by sfedge's profiler in rotation (A B C C B A ...).

    Each file runs in its own worker process on a real input (``samples``: one
    float32 NCHW array for every file, or a dict of them by key); the parent
    alternates blocks of inferences between the workers, so the load of this
    shared machine lands on all of them alike.
    """
    from sfedge.fileio import sha256_bytes
    from sfedge.profile.schedule import measure_group
    from sfedge.profile.types import MeasureConfig, Subject

    subjects = []
    for k, p in paths.items():
        x = samples[k] if isinstance(samples, dict) else samples
        npy = work / f"input-{sha256_bytes(x.tobytes())[:12]}.npy"
        if not npy.exists():
            np.save(npy, np.ascontiguousarray(x, np.float32))
        subjects.append(Subject(Path(p), "tflite", k, "", label=k, threads=threads, input=npy,
                                options={"layout": "NHWC"}))  # every file here is NHWC
    config = MeasureConfig(runs=RUNS, min_seconds=1.0, processes=1, threads=threads)
    measurements, _ = measure_group(subjects, 0, config)
    return {m.label: {"median_ms": m.summary.median, "p90_ms": m.summary.p90, "cv": m.summary.cv,
                      "runs": m.summary.n} for m in measurements}


def _pair(label: str, sources: dict, target, calib, work: Path, trained: bool) -> dict[str, Any]:
    """Build fp32 / fp16 / int8 of both models, then time all six files in one interleaved run."""
    from sfedge.backends.tflite.make import make
    from sfedge.nn import count_macs

    macs = {k: count_macs(s.model, s.input_shape) for k, s in sources.items()}
    result: dict[str, Any] = {"pair": label, "trained": trained, "macs": macs,
                              "mac_ratio": macs["vanilla"] / macs["sfconv"], "precisions": {}}
    opts = {} if trained else {"max_float_fraction": 0.0}
    arts = {(k, p): make(src, target, p, calib, work, **opts) for p in PRECISIONS for k, src in sources.items()}
    lat = interleaved({f"{k}-{p}": a.path for (k, p), a in arts.items()}, calib.holdout[:1], work)
    for p in PRECISIONS:
        v, s = lat[f"vanilla-{p}"], lat[f"sfconv-{p}"]
        speedup = v["median_ms"] / s["median_ms"]
        result["precisions"][p] = {
            "latency": {"vanilla": v, "sfconv": s}, "speedup": speedup, "achieved_fraction": speedup / result["mac_ratio"],
            "bytes": {k: arts[k, p].path.stat().st_size for k in sources},
            "parity": {k: arts[k, p].parity.as_dict() for k in sources},
            "float_layers": {k: arts[k, p].float_layers for k in sources},
            "notes": {k: arts[k, p].notes for k in sources},
            "op_report": {k: arts[k, p].meta["op_report"] for k in sources},
        }
    result["sfconv_int8_vs_vanilla_fp32"] = lat["vanilla-fp32"]["median_ms"] / lat["sfconv-int8"]["median_ms"]
    result["files"] = {f"{k}-{p}": str(a.path) for (k, p), a in arts.items()}
    return result


def _blocks(widths: list[int]) -> list[str]:
    """The DoubleConv blocks of a U-Net, in execution order (the 3x3 convs SFConv factorizes live there)."""
    n = len(widths) - 1
    return ["inc"] + [f"downs.{i}.1" for i in range(n)] + [f"ups.{i}.conv" for i in range(n)]


def _block_inputs(model, blocks: list[str], x) -> dict[str, Any]:
    """Each block's input tensors when ``model`` runs on ``x`` (N, C, H, W)."""
    import torch

    seen: dict[str, Any] = {}
    hooks = [model.get_submodule(b).register_forward_pre_hook(lambda _m, a, b=b: seen.__setitem__(b, a[0].detach().clone()))
             for b in blocks]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return {b: seen[b].numpy() for b in blocks}


def _block_study(models: dict[str, Any], whole: dict[str, str], calib, work: Path) -> dict[str, Any]:
    """Time each DoubleConv block alone, dense vs SFConv, fp32 and int8, against its own MAC ratio.

    Where a block reaches its MAC ratio and the whole model does not, the time
    goes to the rest of the network (pooling, transposed convs, concatenation,
    head), which SFConv does not shrink.  A block slower factorized than
    dense should be folded (``sfedge.nn.fold(model, only=[block + ".*"])``).
    """
    import copy

    from sfedge.backends.tflite.convert import convert_float
    from sfedge.backends.tflite.quantize import build_recipe, calibrate, write_quantized
    from sfedge.nn import count_macs

    blocks = _blocks(BIG_WIDTHS)
    inputs = {k: _block_inputs(m, blocks, calib.calibration[:8]) for k, m in models.items()}
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, dict[str, float]]] = {}
    for block in blocks:
        row: dict[str, Any] = {"block": block, "input_shape": list(inputs["vanilla"][block].shape[1:])}
        files: dict[str, dict[str, Path]] = {"fp32": {}, "int8": {}}
        for k, model in models.items():
            module = copy.deepcopy(model.get_submodule(block)).eval()
            x = inputs[k][block]
            shape = (1, *x.shape[1:])
            row[f"macs_{k}"] = count_macs(module, shape)
            fp32 = convert_float(module, shape, "NHWC", work / f"block-{k}-{block.replace('.', '-')}-fp32.tflite")
            recipe = build_recipe("int8")
            samples = [{"args_0": np.ascontiguousarray(x[i : i + 1].transpose(0, 2, 3, 1))} for i in range(len(x))]
            qsvs = calibrate(fp32, samples, "serving_default", recipe)
            files["fp32"][k] = fp32
            files["int8"][k] = write_quantized(fp32, fp32.with_name(fp32.name.replace("-fp32", "-int8")), recipe, qsvs)
        row["mac_ratio"] = row["macs_vanilla"] / row["macs_sfconv"]
        row["files"] = files
        rows.append(row)
    # One interleaved run per precision: every block of both models and both whole models, so the
    # whole-minus-blocks remainder compares numbers measured under the same machine load.
    for precision in ("fp32", "int8"):
        paths = {f"{k}:{r['block']}": r["files"][precision][k] for r in rows for k in models}
        samples = {f"{k}:{r['block']}": inputs["vanilla"][r["block"]][:1] for r in rows for k in models}
        for k in models:
            paths[f"{k}:whole"], samples[f"{k}:whole"] = Path(whole[f"{k}-{precision}"]), calib.holdout[:1]
        lat = interleaved(paths, samples, work)
        for r in rows:
            v, s = lat[f"vanilla:{r['block']}"]["median_ms"], lat[f"sfconv:{r['block']}"]["median_ms"]
            r[precision] = {"vanilla_ms": v, "sfconv_ms": s, "speedup": v / s, "achieved_fraction": v / s / r["mac_ratio"]}
        totals[precision] = {
            k: {"whole_ms": lat[f"{k}:whole"]["median_ms"],
                "rest_ms": lat[f"{k}:whole"]["median_ms"] - sum(r[precision][f"{k}_ms"] for r in rows)}
            for k in models
        }
    for r in rows:
        r["files"] = {p: {k: str(v) for k, v in f.items()} for p, f in r["files"].items()}
    return {"blocks": rows, "whole": totals}


def run(out: Path) -> str:
    import torch

    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.demo import demo_checkpoints
    from sfedge.models import create_model
    from sfedge.source import ModelSource
    from sfedge.targets import load_target

    torch.set_num_threads(THREADS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = out / "tflite-work"
    work.mkdir(parents=True, exist_ok=True)
    calib = load_calibration("fundus-demo", (256, 256))
    host = load_target("host-cpu")
    (work / "bench-untrained.toml").write_text(UNTRAINED_TARGET)
    untrained = load_target(work / "bench-untrained.toml")

    ckpts = demo_checkpoints()
    demo = {k: ModelSource.from_checkpoint(load_checkpoint(ckpts[n]), (256, 256))
            for k, n in (("vanilla", "unet"), ("sfconv", "unet-sfconv"))}
    torch.manual_seed(0)
    big_models = {"vanilla": create_model("unet", widths=BIG_WIDTHS), "sfconv": create_model("unet-sfconv", widths=BIG_WIDTHS, s=0.25)}
    big = {k: _source(m, f"unet{'-sfconv' if k == 'sfconv' else ''}-big") for k, m in big_models.items()}

    pairs = [_pair("demo 16-32-64-128 (trained)", demo, host, calib, work, True),
             _pair("32-64-128-256 (untrained)", big, untrained, calib, work, False)]
    study = _block_study(big_models, pairs[-1]["files"], calib, work)
    (out / "tflite.json").write_text(json.dumps({"threads": THREADS, "pairs": pairs, "block_study": study},
                                                indent=2, default=str))
    return _markdown(pairs, study)


def _parity_cell(r: dict[str, Any], k: str, precision: str) -> str:
    par, fl = r["parity"][k], r["float_layers"][k]
    extra = f", {len(fl)} float layer(s)" if fl and precision != "fp32" else ""
    return f"max {par['max_abs']:.2g}, Dice {par['dice_agreement']:.4f}{extra}"


def _markdown(pairs: list[dict[str, Any]], study: list[dict[str, Any]]) -> str:
    md = [
        f"## TFLite / XNNPACK on this CPU ({THREADS} threads): SFConv (s=0.25) vs vanilla U-Net",
        "",
        "Median of at least 50 runs per file (sfedge's profiler: each file in its own worker process, all six files of a",
        "pair measured in one rotation A B C C B A ..., so machine load lands on all alike).",
        "Speed-up = vanilla / SFConv latency; MAC ratio = vanilla / SFConv MACs (the speed-up bound); achieved =",
        "speed-up / MAC ratio. Parity: max abs and mask Dice agreement against torch on the held-out split.",
        "",
        "| pair | precision | vanilla ms | SFConv ms | speed-up | MAC ratio | achieved | vanilla KB | SFConv KB | parity vanilla | parity SFConv |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pr in pairs:
        for prec, r in pr["precisions"].items():
            lat = r["latency"]
            cells = {k: _parity_cell(r, k, prec) for k in ("vanilla", "sfconv")}
            md.append(f"| {pr['pair']} | {prec} | {lat['vanilla']['median_ms']:.1f} | {lat['sfconv']['median_ms']:.1f} | "
                      f"{r['speedup']:.2f}x | {pr['mac_ratio']:.2f}x | {r['achieved_fraction']:.2f} | "
                      f"{r['bytes']['vanilla'] / 1024:.0f} | {r['bytes']['sfconv'] / 1024:.0f} | {cells['vanilla']} | {cells['sfconv']} |")
    md += ["", "| pair | vanilla GMAC | SFConv GMAC | SFConv int8 vs vanilla fp32 (aim >= 12x) | fp32 achieved (aim >= 0.95) | int8 achieved (aim >= 0.9) |",
           "|---|---|---|---|---|---|"]
    for pr in pairs:
        md.append(f"| {pr['pair']} | {pr['macs']['vanilla'] / 1e9:.2f} | {pr['macs']['sfconv'] / 1e9:.2f} | "
                  f"{pr['sfconv_int8_vs_vanilla_fp32']:.1f}x | {pr['precisions']['fp32']['achieved_fraction']:.2f} | "
                  f"{pr['precisions']['int8']['achieved_fraction']:.2f} |")
    md += ["", "Op reports: " + "; ".join(
        f"{pr['pair']} {prec}: " + ", ".join(
            f"{k} {r['op_report'][k]['ops']} ops, {r['op_report'][k]['transposes']} TRANSPOSE, "
            f"XNNPACK fallback {r['op_report'][k]['xnnpack_fallback'] or 'none'}" for k in ("vanilla", "sfconv"))
        for pr in pairs for prec, r in pr["precisions"].items() if prec == "int8") + ".",
        "",
        "fp16 files store fp16 weights that x86 XNNPACK up-casts at load: on this CPU they run at fp32 speed; the",
        "gain (fp16 arithmetic, half the weight bandwidth) needs an ARM core with fp16 (android-arm64 target).",
    ]
    if study:
        md += ["", "### Per block (32-64-128-256, untrained): where the speed-up goes",
               "", "Each U-Net DoubleConv block converted and timed alone at its input shape, dense vs SFConv, in one",
               "rotation per precision together with both whole models. 'rest' = whole model minus its blocks:",
               "max pooling, transposed convs, skip concatenations, the head and per-op overhead, which SFConv leaves as",
               "they are.",
               "", "| block | input | MAC ratio | fp32 dense ms | fp32 SFConv ms | fp32 speed-up | achieved | int8 dense ms | int8 SFConv ms | int8 speed-up | achieved |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in study["blocks"]:
            f, q = row["fp32"], row["int8"]
            md.append(f"| {row['block']} | {'x'.join(map(str, row['input_shape']))} | {row['mac_ratio']:.2f}x | "
                      f"{f['vanilla_ms']:.2f} | {f['sfconv_ms']:.2f} | {f['speedup']:.2f}x | {f['achieved_fraction']:.2f} | "
                      f"{q['vanilla_ms']:.2f} | {q['sfconv_ms']:.2f} | {q['speedup']:.2f}x | {q['achieved_fraction']:.2f} |")
        cells = []
        for label, key in (("rest", "rest_ms"), ("whole model", "whole_ms")):
            cells = [f"{study['whole'][p]['vanilla'][key]:.2f} | {study['whole'][p]['sfconv'][key]:.2f} | "
                     f"{study['whole'][p]['vanilla'][key] / study['whole'][p]['sfconv'][key]:.2f}x | -" for p in ("fp32", "int8")]
            md.append(f"| {label} | - | - | {cells[0]} | {cells[1]} |")
    return "\n".join(md)
