"""ONNX / Q-DQ benchmark: parity per precision, calibration methods, per-layer sensitivity, ONNX Runtime latency.

For the trained demo pair (vanilla U-Net vs SFConv s=0.25) at 256x256 on the
fundus-demo held-out split:

* parity against fp32 torch for fp32 ONNX, fp16 ONNX, all-layers int8 Q/DQ
  and mixed-precision int8 (entropy ranges), with the layers kept in float;
* all-layers int8 parity per calibration method (minmax, percentile, entropy);
* the per-layer sensitivity table of the SFConv model;
* ONNX Runtime CPU latency (2 threads), vanilla and SFConv interleaved run by
  run, median of >= 50 after warm-up, fp32 and int8.

``run(out_dir)`` writes ``onnx_qdq.json`` and returns a Markdown section.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("unet", "unet-sfconv")
THREADS = 2
RUNS = 60
WARMUP = 5


def run(out_dir: Path) -> str:
    """Run the benchmark, write raw JSON into ``out_dir``, return the Markdown section."""
    from sfedge.backends.onnxruntime.make import ort_scorer
    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.demo import demo_checkpoints
    from sfedge.export import export_onnx
    from sfedge.fileio import write_json
    from sfedge.quantize.mixed import PROBE_SAMPLES, mixed_precision
    from sfedge.quantize.qdq import quantize_qdq, to_fp16
    from sfedge.quantize.ranges import compute_ranges
    from sfedge.source import ModelSource
    from sfedge.targets import load_target

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = load_target("host-cpu")
    calib = load_calibration("fundus-demo", tuple(target.input_size))
    ckpts = demo_checkpoints()
    results: dict[str, Any] = {"threads": THREADS, "runs": RUNS, "input_size": list(target.input_size),
                               "holdout_samples": len(calib.holdout), "models": {}}
    paths: dict[tuple[str, str], Path] = {}
    with tempfile.TemporaryDirectory(prefix="sfedge-bench-onnx-") as tmp:
        work = Path(tmp)
        for name in MODELS:
            src = ModelSource.from_checkpoint(load_checkpoint(ckpts[name]), target.input_size)
            ref = src.reference(calib.holdout)
            entry: dict[str, Any] = {"parity": {}, "methods": {}, "timings_s": {}}
            t = time.perf_counter()
            score = ort_scorer(THREADS)
            fp32 = export_onnx(src, work / f"{name}.onnx", score=score, check_inputs=calib.holdout)
            entry["timings_s"]["export"] = time.perf_counter() - t
            entry["parity"]["fp32"] = fp32.parity.as_dict()
            fp16 = to_fp16(fp32, work / f"{name}-fp16.onnx")
            entry["parity"]["fp16"] = score(fp16.path, calib.holdout, ref).as_dict()
            ranges = {}
            for method in ("minmax", "percentile", "entropy"):
                t = time.perf_counter()
                ranges[method] = compute_ranges(fp32.path, calib, method)
                entry["timings_s"][f"ranges_{method}"] = time.perf_counter() - t
                art = quantize_qdq(fp32, calib, work / f"{name}-int8-{method}.onnx", method=method,
                                   ranges=ranges[method], reference=ref, score=score, write_ranges_file=False)
                entry["methods"][method] = art.parity.as_dict()
            entry["parity"]["int8 (all layers)"] = entry["methods"]["entropy"]
            t = time.perf_counter()
            probe = calib.calibration[:PROBE_SAMPLES]
            mixed, report = mixed_precision(fp32, calib, work / f"{name}-int8.onnx", reference=ref,
                                            probe_reference=src.reference(probe), tolerance=target.tolerance("int8"),
                                            score=score, method="entropy", ranges=ranges["entropy"])
            entry["timings_s"]["mixed_precision"] = time.perf_counter() - t
            entry["parity"]["int8 (mixed)"] = mixed.parity.as_dict()
            entry["mixed_precision"] = report.as_dict()
            entry["entropy_vs_minmax"] = _range_ratio(ranges["entropy"], ranges["minmax"])
            results["models"][name] = entry
            paths[(name, "fp32")], paths[(name, "fp16")], paths[(name, "int8")] = fp32.path, fp16.path, mixed.path
            paths[(name, "int8 (all layers)")] = work / f"{name}-int8-entropy.onnx"
        results["latency_ms"] = _latency(paths)
    write_json(out_dir / "onnx_qdq.json", results)
    return _markdown(results, target.tolerance("int8"))


def _range_ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    r = np.array([a[k] / b[k] for k in b if b[k] > 0])
    return {"tensors": int(r.size), "median_ratio": float(np.median(r)), "min_ratio": float(r.min()),
            "narrower_than_95pct": int((r < 0.95).sum())}


def _latency(paths: dict[tuple[str, str], Path]) -> dict[str, dict[str, float]]:
    """SFConv vs vanilla per precision through the profiler: worker processes, alternating A B B A, bootstrap CI.

    One process with several ONNX Runtime sessions would let idle sessions' spinning thread pools slow the
    measured one (the profiler found up to 40%), so the profiler's own paired mode is used.
    """
    from sfedge.profile.schedule import measure_pair
    from sfedge.profile.types import MeasureConfig, Subject

    config = MeasureConfig(runs=RUNS, min_seconds=1.0, threads=THREADS)
    out = {}
    for prec in sorted({p for _, p in paths}):
        a = Subject(paths[("unet-sfconv", prec)], "onnxruntime", "unet-sfconv", prec, threads=THREADS)
        b = Subject(paths[("unet", prec)], "onnxruntime", "unet", prec, threads=THREADS)
        ma, mb, pairing = measure_pair(a, b, config)
        for name, m in (("unet-sfconv", ma), ("unet", mb)):
            out[f"{name} {prec}"] = {"median": m.summary.median, "p90": m.summary.p90, "min": m.summary.min,
                                     "cv": m.summary.cv, "runs": m.summary.n}
        r = pairing.ratio
        out[f"ratio {prec}"] = {"ratio": r.ratio, "low": r.low, "high": r.high}
    return out


def _markdown(res: dict[str, Any], tol: Any) -> str:
    lines = ["## ONNX export, Q/DQ INT8 and ONNX Runtime (CPU)", ""]
    lines.append(f"Trained demo U-Nets at {res['input_size'][0]}x{res['input_size'][1]}, parity against fp32 torch on "
                 f"{res['holdout_samples']} held-out fundus crops. Int8 = explicit Q/DQ (TensorRT placement: "
                 "int8 symmetric, per-channel weights, per-tensor activations, float bias), entropy calibration "
                 f"(2048 bins); mixed precision keeps the most sensitive layers in float until mask Dice agreement "
                 f">= {tol.dice_agreement}.")
    lines += ["", "| model | precision | max abs | cosine | mask Dice agreement | layers in float |",
              "|---|---|---:|---:|---:|---|"]
    for name, e in res["models"].items():
        mp = e["mixed_precision"]
        for prec, p in e["parity"].items():
            fl = {"int8 (mixed)": f"{len(mp['float_layers'])}/{mp['layers']}: " + ", ".join(mp["float_layers"]),
                  "int8 (all layers)": f"0/{mp['layers']}"}.get(prec, "")
            lines.append(f"| {name} | {prec} | {p['max_abs']:.3g} | {p['cosine']:.6f} | {p['dice_agreement']:.4f} | {fl} |")
    lines += ["", "All layers int8, by calibration method (mask Dice agreement / cosine):", "",
              "| model | minmax | percentile 99.999 | entropy | entropy amax / minmax amax (median over tensors) |",
              "|---|---:|---:|---:|---:|"]
    for name, e in res["models"].items():
        m = e["methods"]
        cells = " | ".join(f"{m[k]['dice_agreement']:.4f} / {m[k]['cosine']:.5f}" for k in ("minmax", "percentile", "entropy"))
        lines.append(f"| {name} | {cells} | {e['entropy_vs_minmax']['median_ratio']:.3f} |")
    lat = res["latency_ms"]
    lines += ["", f"ONNX Runtime CPU EP, {res['threads']} threads, the profiler's paired mode (worker process per "
              "configuration, alternating A B B A, >= 50 runs and 1 s each), medians in ms:", "",
              "| precision | vanilla | SFConv | SFConv / vanilla [95% CI] |", "|---|---:|---:|---:|"]
    worst = max((v for k, v in lat.items() if not k.startswith("ratio")), key=lambda v: v["cv"])["cv"]
    for prec in ("fp32", "fp16", "int8 (all layers)", "int8"):
        v, s = lat[f"unet {prec}"], lat[f"unet-sfconv {prec}"]
        label = "int8 (mixed)" if prec == "int8" else prec
        r = lat[f"ratio {prec}"]
        lines.append(f"| {label} | {v['median']:.1f} (p90 {v['p90']:.1f}) | {s['median']:.1f} (p90 {s['p90']:.1f}) | "
                     f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}] |")
    lines += ["", f"Largest coefficient of variation: {worst:.0%}" + (" (noisy: the machine was busy; compare ratios)"
                                                                        if worst > 0.1 else ""),
              "", "ONNX Runtime's CPU EP runs Q/DQ graphs by dequantizing into its float kernels (the TensorRT "
              "placement leaves conv outputs unquantized, so nothing fuses into QLinearConv): int8 here measures "
              "parity, not int8 speed. fp16 ONNX also runs at fp32 speed (casts inserted around float32 kernels)."]
    sf = res["models"].get("unet-sfconv")
    if sf:
        mp = sf["mixed_precision"]
        kept = set(mp["float_layers"])
        samples = mp["sensitivity"][0]["samples"] if mp["sensitivity"] else 0
        lines += ["", f"Per-layer INT8 sensitivity of the SFConv model (one layer int8, the rest float; "
                  f"{samples} calibration samples; ranked only when all-int8 misses the tolerance), "
                  "most sensitive first:", "",
                  "| # | layer | role | mean abs | max abs | mask Dice agreement | kept float |", "|---:|---|---|---:|---:|---:|---|"]
        for i, s in enumerate(mp["sensitivity"], 1):
            lines.append(f"| {i} | `{s['layer']}` | {s['role']} | {s['mean_abs']:.4f} | {s['max_abs']:.3f} | "
                         f"{s['dice_agreement']:.4f} | {'yes' if s['layer'] in kept else ''} |")
        lines.append("")
        lines.append(f"Mixed precision took {sf['timings_s']['mixed_precision']:.0f} s for the SFConv model "
                     f"(sensitivity of {len(mp['sensitivity'])} of {mp['layers']} layers plus "
                     f"{len(mp['steps']) - 1} search step(s)); the float layers cost "
                     f"{mp['float_cost_fraction']:.0%} of the model's MACs.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("reports") / "bench"
    print(run(out))
