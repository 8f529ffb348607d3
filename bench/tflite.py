"""TFLite on this CPU (XNNPACK, 2 threads): SFConv (s=0.25) vs vanilla U-Net, fp32 / fp16 / int8.

Two pairs, each timed side by side in one run (A B A B ... interleaved):

* the trained demo pair (16-32-64-128), built with ``sfedge.backends.tflite.make``
  for host-cpu, parity-checked and (int8) mixed precision where needed;
* a 32-64-128-256 pair at 256x256 with *untrained* weights (latency only: its
  parity numbers say only that the conversion is exact, not that a model works).

For each: median latency, the speed-up, the MAC ratio (the speed-up bound) and
the achieved fraction of it, file sizes and parity.  Then, for the big pair,
where the fraction falls short: each U-Net block's SFConv layers folded back
into dense 3x3 convs (``sfedge.nn.fold``), one block at a time, timed against the
all-factorized model, showing which blocks' factorization does not pay.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

THREADS = 2
ROUNDS, PER_ROUND, WARMUP = 10, 5, 5  # 50 timed runs per file, interleaved in rounds of 5
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
    from sfedge.backends.base import ModelSource
    from sfedge.backends.tflite.convert import contiguous_
    from sfedge.checkpoint import weights_sha256

    model = contiguous_(model.eval())
    return ModelSource(model, name, dict(getattr(model, "sfedge_config", {})), weights_sha256(model.state_dict()),
                       (1, 3, 256, 256))


def interleaved(paths: dict[str, Path], sample, threads: int = THREADS) -> dict[str, dict[str, float]]:
    """Median / p10 / p90 latency (ms) of each file, timed in interleaved rounds on one real input."""
    from sfedge.backends.tflite.runner import TFLiteRunner

    runners = {k: TFLiteRunner(p, threads=threads) for k, p in paths.items()}
    for r in runners.values():
        r.__enter__()
    try:
        feeds = {k: r.prepare(sample) for k, r in runners.items()}
        for k, r in runners.items():
            for _ in range(WARMUP):
                r.infer(feeds[k])
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(ROUNDS):
            for k, r in runners.items():
                for _ in range(PER_ROUND):
                    t = time.perf_counter()
                    r.infer(feeds[k])
                    times[k].append((time.perf_counter() - t) * 1e3)
    finally:
        for r in runners.values():
            r.__exit__(None, None, None)
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        out[k] = {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1], "runs": len(ts)}
    return out


def _pair(label: str, sources: dict, target, calib, work: Path, trained: bool) -> dict[str, Any]:
    from sfedge.backends.tflite import make
    from sfedge.nn import count_macs

    macs = {k: count_macs(s.model, s.input_shape) for k, s in sources.items()}
    result: dict[str, Any] = {"pair": label, "trained": trained, "macs": macs,
                              "mac_ratio": macs["vanilla"] / macs["sfconv"], "precisions": {}}
    artifacts = {}
    for precision in ("fp32", "fp16", "int8"):
        arts = {}
        for k, src in sources.items():
            opts = {} if trained else {"max_float_fraction": 0.0}
            arts[k] = make(src, target, precision, calib, work, **opts)
        artifacts[precision] = arts
        lat = interleaved({k: a.path for k, a in arts.items()}, calib.holdout[:1])
        speedup = lat["vanilla"]["median_ms"] / lat["sfconv"]["median_ms"]
        result["precisions"][precision] = {
            "latency": lat, "speedup": speedup, "achieved_fraction": speedup / result["mac_ratio"],
            "bytes": {k: a.path.stat().st_size for k, a in arts.items()},
            "parity": {k: a.parity for k, a in arts.items()},
            "float_layers": {k: a.float_layers for k, a in arts.items()},
            "op_report": {k: a.meta["op_report"] for k, a in arts.items()},
        }
    fp32_v = result["precisions"]["fp32"]["latency"]["vanilla"]["median_ms"]
    # SFConv int8 against vanilla fp32, measured side by side in one more interleaved run.
    lat = interleaved({"vanilla-fp32": artifacts["fp32"]["vanilla"].path,
                       "sfconv-int8": artifacts["int8"]["sfconv"].path}, calib.holdout[:1])
    result["sfconv_int8_vs_vanilla_fp32"] = lat["vanilla-fp32"]["median_ms"] / lat["sfconv-int8"]["median_ms"]
    result["vanilla_fp32_ms"] = fp32_v
    return result


def _fold_study(sfconv_model, target, calib, work: Path) -> list[dict[str, Any]]:
    """Fold one U-Net block's SFConv layers at a time; time against the all-factorized model (fp32 and int8)."""
    import copy

    from sfedge.backends.tflite import make
    from sfedge.nn import SFConv2d, count_macs, fold

    blocks = ["inc"] + [f"downs.{i}" for i in range(len(BIG_WIDTHS) - 1)] + [f"ups.{i}" for i in range(len(BIG_WIDTHS) - 1)]
    base = _source(sfconv_model, "unet-sfconv-big")
    rows = []
    base_arts = {p: make(base, target, p, calib, work, max_float_fraction=0.0) for p in ("fp32", "int8")}
    for block in blocks:
        model = copy.deepcopy(sfconv_model)
        folded = fold(model, only=[f"{block}.*"])
        if not folded:
            continue
        src = _source(model, f"unet-sfconv-big-fold-{block.replace('.', '-')}")
        row: dict[str, Any] = {"block": block, "folded": folded, "macs": count_macs(model, src.input_shape),
                               "ranks": [m.rank for n, m in sfconv_model.named_modules() if n in folded and isinstance(m, SFConv2d)]}
        for p in ("fp32", "int8"):
            art = make(src, target, p, calib, work, max_float_fraction=0.0)
            lat = interleaved({"factorized": base_arts[p].path, "folded": art.path}, calib.holdout[:1])
            row[p] = {"factorized_ms": lat["factorized"]["median_ms"], "folded_ms": lat["folded"]["median_ms"]}
        rows.append(row)
    return rows


def run(out: Path) -> str:
    import torch

    from sfedge.backends.base import ModelSource
    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.demo import demo_checkpoints
    from sfedge.models import create_model
    from sfedge.nn import count_macs
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
    study = _fold_study(big_models["sfconv"], untrained, calib, work)
    big_macs = count_macs(big_models["sfconv"], (1, 3, 256, 256))
    (out / "tflite.json").write_text(json.dumps({"threads": THREADS, "pairs": pairs, "fold_study": study,
                                                 "big_sfconv_macs": big_macs}, indent=2, default=str))
    return _markdown(pairs, study)


def _parity_cell(r: dict[str, Any], k: str, precision: str) -> str:
    par, fl = r["parity"][k], r["float_layers"][k]
    extra = f", {len(fl)} float layer(s)" if fl and precision != "fp32" else ""
    return f"max {par['max_abs']:.2g}, Dice {par['dice_agreement']:.4f}{extra}"


def _markdown(pairs: list[dict[str, Any]], study: list[dict[str, Any]]) -> str:
    md = [
        f"## TFLite / XNNPACK on this CPU ({THREADS} threads): SFConv (s=0.25) vs vanilla U-Net",
        "",
        "Median of 50 runs per file, the two files of a row timed in interleaved rounds (A B A B) in one process.",
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
        md += ["", "### Where factorization does not pay (32-64-128-256, untrained): fold one block at a time",
               "", "Each row folds one U-Net block's SFConv layers back into exact dense 3x3 convs and times it against the",
               "all-factorized model (interleaved). A folded time below the factorized one means that block is faster dense.",
               "", "| block | ranks | model GMAC after fold | fp32 factorized ms | fp32 folded ms | int8 factorized ms | int8 folded ms |",
               "|---|---|---|---|---|---|---|"]
        for row in study:
            md.append(f"| {row['block']} | {row['ranks']} | {row['macs'] / 1e9:.2f} | {row['fp32']['factorized_ms']:.1f} | "
                      f"{row['fp32']['folded_ms']:.1f} | {row['int8']['factorized_ms']:.1f} | {row['int8']['folded_ms']:.1f} |")
    return "\n".join(md)
