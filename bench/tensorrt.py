"""TensorRT section of `make bench`: the workstation half of the Jetson path, measured on this CPU.

No engine can be built here (no GPU, no TensorRT), so this measures what the
workstation does for a Jetson target and what it hands to the device:

* ``make()`` wall time per (target, precision) for the trained demo pair
  (vanilla U-Net vs SFConv s=0.25), interleaved model by model, at the
  target's input size (512x512 for the Jetsons): export + checks, int8
  quantization and mixed precision, lint, calibration cache, commands;
* the device folder: file sizes, the ONNX the engine is built from, its
  ONNX Runtime parity against torch (the CPU stand-in; the engine's own parity
  is checked on the device), and the outcome (device folder, or the one-line
  error that stopped it);
* the lint's own cost per TensorRT release (median of repeated runs).

``run(out_dir)`` writes ``tensorrt.json`` and returns a Markdown section.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("unet", "unet-sfconv")
TARGETS = ("jetson-xavier-nx", "jetson-orin-nano")
PRECISIONS = ("fp32", "fp16", "int8")
LINT_REPEATS = 5


def run(out_dir: Path) -> str:
    """Run the benchmark, write raw JSON into ``out_dir``, return the Markdown section."""
    from sfedge.backends.tensorrt.make import make
    from sfedge.backends.tensorrt.rules import lint_onnx
    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.demo import demo_checkpoints
    from sfedge.errors import SfedgeError
    from sfedge.source import ModelSource
    from sfedge.targets import load_target

    ckpts = demo_checkpoints()
    rows: list[dict[str, Any]] = []
    lint_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sfedge-bench-trt-") as tmp:
        for target_name in TARGETS:
            target = load_target(target_name)
            size = tuple(target.input_size)
            calib = load_calibration("fundus-demo", size)
            sources = {m: ModelSource.from_checkpoint(load_checkpoint(ckpts[m]), size) for m in MODELS}
            for precision in PRECISIONS:
                for model in MODELS:  # interleaved: both models see the same machine state per precision
                    work = Path(tmp) / target_name / model
                    start = time.perf_counter()
                    row: dict[str, Any] = {"target": target_name, "tensorrt": target.tensorrt_version,
                                           "model": model, "precision": precision, "input": list(size)}
                    try:
                        art = make(sources[model], target, precision, calib, work)
                        row.update(outcome=art.kind, onnx=art.meta["onnx"], parity=art.parity.as_dict() if art.parity else {},
                                   float_layers=len(art.float_layers),
                                   files={p.name: p.stat().st_size for p in art.files})
                    except SfedgeError as e:
                        row.update(outcome="error", error=str(e))
                    row["seconds"] = round(time.perf_counter() - start, 2)
                    rows.append(row)
                    print(f"  {target_name} {precision} {model}: {row['outcome']} {row['seconds']} s", file=sys.stderr)
            fp32 = next((r for r in rows if r["target"] == target_name and r["precision"] == "fp32"
                         and r["model"] == "unet" and r["outcome"] == "device-folder"), None)
            if fp32 is not None and not lint_rows:  # the lint's cost on one file is enough
                onnx_path = Path(tmp) / target_name / "unet"
                onnx_file = next(onnx_path.glob("*-tensorrt-fp32/model.onnx"))
                for version in ("8.5.2", "10.3", "11.0"):
                    times = []
                    for _ in range(LINT_REPEATS):
                        t0 = time.perf_counter()
                        violations = lint_onnx(onnx_file, tensorrt_version=version)
                        times.append(time.perf_counter() - t0)
                    lint_rows.append({"onnx": f"unet {size[0]}x{size[1]}", "tensorrt": version,
                                      "violations": len(violations), "median_ms": round(1e3 * statistics.median(times), 1)})
    (Path(out_dir) / "tensorrt.json").write_text(json.dumps({"make": rows, "lint": lint_rows}, indent=2))
    return _markdown(rows, lint_rows)


def _markdown(rows: list[dict[str, Any]], lint_rows: list[dict[str, Any]]) -> str:
    out = [
        "## TensorRT (workstation side; engines are built on the device)",
        "",
        "`make()` on this CPU for each Jetson target, demo pair interleaved. Parity is the ONNX Runtime stand-in "
        "of the ONNX the engine is built from (fp16 weakly typed: TensorRT picks fp16 kernels at build time, so "
        "nothing runs here).",
        "",
        "| target (TensorRT) | precision | model | outcome | builds from | dice | max abs | folder MB | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["outcome"] == "error":
            out.append(f"| {r['target']} ({r['tensorrt']}) | {r['precision']} | {r['model']} | error: "
                       f"{r['error'][:140]} | | | | | {r['seconds']} |")
            continue
        p = r.get("parity") or {}
        dice = f"{p['dice_agreement']:.4f}" if "dice_agreement" in p else "-"
        mx = f"{p['max_abs']:.2e}" if "max_abs" in p else "-"
        mb = sum(r["files"].values()) / 1e6
        out.append(f"| {r['target']} ({r['tensorrt']}) | {r['precision']} | {r['model']} | {r['outcome']} | "
                   f"{r['onnx']} | {dice} | {mx} | {mb:.2f} | {r['seconds']} |")
    if lint_rows:
        out += ["", f"Lint cost (median of {LINT_REPEATS}, shape inference included):", "",
                "| ONNX | TensorRT | violations | ms |", "|---|---|---|---|"]
        out += [f"| {r['onnx']} | {r['tensorrt']} | {r['violations']} | {r['median_ms']} |" for r in lint_rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/bench")
    target.mkdir(parents=True, exist_ok=True)
    print(run(target))
