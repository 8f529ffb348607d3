"""Fidelity section of `make bench`: does the profiler's median match an independent timing of the same loop?

For the vanilla demo U-Net's host-cpu fp32 artifacts (ONNX Runtime and
TFLite), alternately (so both see the same machine state):

* the profiler: ``sfedge.profile.schedule.measure`` (its worker processes,
  warm-up, per-inference ``perf_counter_ns``), median and mean;
* an independent timing: a fresh Python process that loads the artifact with
  the runtime's own API (no sfedge code), warms up, then times N inferences
  with ``time.perf_counter`` around the whole loop and divides by N.

Repeated ``REPEATS`` times, which also gives the profiler's run-to-run spread
of medians.  The whole-loop figure is a mean, so it is compared with both the
profiler's median (what reports quote) and its mean (the like-for-like
number); on a loaded machine the two differ by the weight of the slow tail.

    python bench/fidelity.py --out reports/bench
    python bench/fidelity.py --loop ARTIFACT --backend onnxruntime --threads 2 --runs 100   (the independent timer)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 5
RUNS = 100
WARMUP = 10


def independent_loop(path: str, backend: str, threads: int, runs: int, warmup: int, input_npy: str | None) -> float:
    """Seconds per inference: runtime API only, perf_counter around the whole loop of ``runs`` inferences."""
    import numpy as np

    x = np.load(input_npy)[:1].astype(np.float32) if input_npy else None
    if backend == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        feed = {inp.name: x if x is not None else np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)}

        def infer() -> None:
            sess.run(None, feed)
    else:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=path, num_threads=threads)
        runner = interp.get_signature_runner()
        name, detail = next(iter(runner.get_input_details().items()))
        shape = detail["shape"]
        if x is not None and len(shape) == 4 and shape[-1] == x.shape[1]:
            x = x.transpose(0, 2, 3, 1)  # the artifact is NHWC
        if np.dtype(detail["dtype"]).kind in "iu":
            scale, zero = detail["quantization_parameters"]["scales"][0], detail["quantization_parameters"]["zero_points"][0]
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(detail["dtype"])
        feed = {name: np.ascontiguousarray(x)}

        def infer() -> None:
            runner(**feed)
    for _ in range(warmup):
        infer()
    start = time.perf_counter()
    for _ in range(runs):
        infer()
    return (time.perf_counter() - start) / runs


def run(out: Path) -> str:
    from sfedge.build import build_bundle
    from sfedge.demo import demo_checkpoints
    from sfedge.profile.schedule import measure
    from sfedge.profile.subjects import subjects_from
    from sfedge.profile.types import MeasureConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(demo_checkpoints()["unet"], "host-cpu", "fp32", out_dir=out / "bundles").path
    config = MeasureConfig(runs=RUNS, min_seconds=1.0, warmup_runs=WARMUP, warmup_seconds=0.5)
    results = {}
    for subject in subjects_from(bundle):
        rows = []
        for _ in range(REPEATS):
            m = measure(subject, config)
            argv = [sys.executable, __file__, "--loop", str(subject.path), "--backend", subject.backend,
                    "--threads", str(subject.threads or 2), "--runs", str(RUNS), "--warmup", str(WARMUP)]
            loop = subprocess.run(argv + (["--input", str(subject.input)] if subject.input else []),
                                  capture_output=True, text=True, check=True)
            rows.append({"profiler_median_ms": m.summary.median, "profiler_mean_ms": m.summary.mean,
                         "profiler_cv": m.summary.cv, "n": m.summary.n,
                         "independent_ms": float(loop.stdout.strip().splitlines()[-1]) * 1e3})
        medians = [r["profiler_median_ms"] for r in rows]
        results[subject.label] = {
            "rows": rows,
            "median_of_medians_ms": statistics.median(medians),
            "spread_of_medians": (max(medians) - min(medians)) / statistics.median(medians),
            "cv_of_medians": statistics.stdev(medians) / statistics.mean(medians),
            "agreement_median": statistics.median(r["profiler_median_ms"] / r["independent_ms"] for r in rows),
            "agreement_mean": statistics.median(r["profiler_mean_ms"] / r["independent_ms"] for r in rows),
        }
    (out / "fidelity.json").write_text(json.dumps(results, indent=2))
    md = [
        "## Profiler fidelity and run-to-run spread (vanilla demo U-Net, host-cpu fp32)",
        "",
        f"{REPEATS} alternating repetitions of: the profiler (default settings: {config.processes} worker processes, "
        f"at least {RUNS} runs and 1 s) and an "
        f"independent fresh process timing {RUNS} inferences with the runtime's own API and one perf_counter around "
        "the whole loop. Ratios are profiler / independent (1.00 = perfect agreement; median over repetitions).",
        "",
        "| artifact | profiler median ms (median of runs) | independent ms/inference (median of runs) | "
        "median / independent | mean / independent | spread of medians (max-min)/median | CV of medians |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        ind = statistics.median(x["independent_ms"] for x in r["rows"])
        md.append(f"| {label} | {r['median_of_medians_ms']:.2f} | {ind:.2f} | {r['agreement_median']:.3f} | "
                  f"{r['agreement_mean']:.3f} | {r['spread_of_medians']:.1%} | {r['cv_of_medians']:.1%} |")
    md += ["", "Per repetition (profiler median / mean / CV, independent):", ""]
    for label, r in results.items():
        md.append(f"- {label}: " + "; ".join(
            f"{x['profiler_median_ms']:.2f} / {x['profiler_mean_ms']:.2f} / {x['profiler_cv']:.0%}, {x['independent_ms']:.2f}"
            for x in r["rows"]))
    return "\n".join(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    ap.add_argument("--loop", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--input")
    args = ap.parse_args()
    if args.loop:
        print(independent_loop(args.loop, args.backend, args.threads, args.runs, args.warmup, args.input))
    else:
        sys.stdout.write(run(args.out) + "\n")
