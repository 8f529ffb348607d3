"""INT8 without float fallbacks: plain calibration vs quantization-aware fine-tuning, per target, for the demo pair.

For the trained demo pair (vanilla U-Net vs SFConv s=0.25), each target's int8
bundle is built twice, with calibration only (entropy and percentile ranges,
mixed precision by gain per cost) and with ``--qat STEPS``:

* host-cpu: the ONNX Runtime Q/DQ file and the full-integer TFLite file;
* android-arm64: the TFLite file (NHWC, 4 threads);
* jetson-orin-nano: the Q/DQ ONNX at 512x512, checked in ONNX Runtime.

Per artifact: layers kept float, mask Dice agreement with torch on the
held-out and on the shifted (augmented) split, held-out Dice against the demo
labels (Frangi pseudo-labels on the right strip of the photograph, tiled at
the artifact's input size) of int8 vs fp32 torch, input/output dtype, file
size and build time.  Then the TFLite int8 files of the pair are timed side by
side with the fp32 ones (sfedge's profiler, interleaved): SFConv's int8
speed-up over vanilla int8 and over vanilla fp32, against its fp32 speed-up.

    python bench/run.py --only int8        (SFEDGE_BENCH_QAT=STEPS, default 150; SFEDGE_BENCH_INT8_TARGETS)

``run(out_dir)`` writes ``int8.json`` (after every build, so a partial run
keeps what it measured) and returns a Markdown section.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("unet", "unet-sfconv")
TARGETS = ("host-cpu", "android-arm64", "jetson-orin-nano")


def _label_dice(run_tiles: Any, size: int) -> float:
    """Dice against the demo pseudo-labels on the held-out strip, tiled at ``size``: run_tiles(x) -> logits."""
    from sfedge.datasets.fundus import holdout_region, load_fundus
    from sfedge.preprocess import FUNDUS_PREPROCESSING

    image, vessels, fov = holdout_region(load_fundus(), 16)
    h, w = vessels.shape
    inter = total = 0
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            tile = FUNDUS_PREPROCESSING.apply(image[y : y + size, x : x + size])[None]
            logits = run_tiles(tile)[0, 0]
            f = fov[y : y + size, x : x + size]
            pred, truth = (logits > 0) & f, (vessels[y : y + size, x : x + size] > 0.5) & f
            inter += int((pred & truth).sum())
            total += int(pred.sum() + truth.sum())
    return 2 * inter / max(1, total)


def _artifact_row(bundle: Any, art: Any, size: int) -> dict[str, Any]:
    from sfedge.backends.registry import runner_for

    path = art.path
    if art.kind == "device-folder":  # TensorRT: the Q/DQ ONNX inside, run by ONNX Runtime
        path = art.path / "model.qdq.onnx"
    with runner_for(path, threads=2) as r:
        dice = _label_dice(r.run, size)
        io = {"input": r.inputs[0].dtype, "output": r.outputs[0].dtype}
    return {
        "backend": art.backend, "file": Path(art.path).name, "float_layers": len(art.float_layers),
        "float_layer_names": list(art.float_layers),
        "dice_holdout": art.parity.dice_agreement if art.parity else None,
        "dice_shifted": art.shifted_parity.dice_agreement if art.shifted_parity else None,
        "label_dice": dice, "io": io,
        "bytes": sum(f.stat().st_size for f in Path(art.path).rglob("*") if f.is_file()) if Path(art.path).is_dir()
        else Path(art.path).stat().st_size,
        "method": (art.meta.get("mixed_precision") or {}).get("method"),
        "float_cost_fraction": (art.meta.get("mixed_precision") or {}).get("float_cost_fraction"),
    }


def run(out_dir: Path) -> str:
    """Run the benchmark, write raw JSON into ``out_dir``, return the Markdown section."""
    import torch

    from sfedge.backends.int8 import Int8Options
    from sfedge.build import build_bundle
    from sfedge.checkpoint import load_checkpoint
    from sfedge.demo import demo_checkpoints
    from sfedge.fileio import write_json
    from sfedge.targets import load_target

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = int(os.environ.get("SFEDGE_BENCH_QAT", "150"))
    targets = os.environ.get("SFEDGE_BENCH_INT8_TARGETS", ",".join(TARGETS)).split(",")
    ckpts = demo_checkpoints()
    results: dict[str, Any] = {"qat_steps": steps, "builds": [], "fp32_label_dice": {}, "speed": {}}
    with tempfile.TemporaryDirectory(prefix="sfedge-bench-int8-") as tmp:
        work = Path(tmp)
        for name in MODELS:
            model = load_checkpoint(ckpts[name]).model.eval()
            for tname in targets:
                size = load_target(tname).input_size[0]
                with torch.no_grad():
                    results["fp32_label_dice"][f"{name}@{size}"] = _label_dice(
                        lambda x, m=model: m(torch.from_numpy(x)).numpy(), size)
        for tname in targets:
            target = load_target(tname)
            for qat in (0, steps):
                for name in MODELS:
                    t = time.perf_counter()
                    row: dict[str, Any] = {"target": tname, "model": name, "qat_steps": qat}
                    try:
                        res = build_bundle(ckpts[name], target, "int8", out_dir=work / f"qat{qat}", force=True,
                                           int8=Int8Options(qat_steps=qat))
                        row["seconds"] = round(time.perf_counter() - t, 1)
                        row["artifacts"] = [_artifact_row(res.bundle, a, target.input_size[0])
                                            for a in res.bundle.artifacts]
                        row["failures"] = res.failures
                    except Exception as e:  # a build that misses its gate is a result here, not a crash
                        row["seconds"] = round(time.perf_counter() - t, 1)
                        row["error"] = f"{type(e).__name__}: {e}"
                    results["builds"].append(row)
                    write_json(out_dir / "int8.json", results)
        if "host-cpu" in targets:
            results["speed"] = _speed(work, steps)
            write_json(out_dir / "int8.json", results)
    return _markdown(results)


def _speed(work: Path, steps: int) -> dict[str, Any]:
    """TFLite int8 (QAT builds) and fp32 of the pair, timed side by side on host-cpu."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tflite import interleaved  # bench/tflite.py: sfedge's profiler in rotation

    from sfedge.bundle import load_bundle
    from sfedge.calibration import load_calibration

    files: dict[str, Path] = {}
    for name, key in (("unet", "vanilla"), ("unet-sfconv", "sfconv")):
        for b in (work / f"qat{steps}").glob(f"{name}-*__host-cpu__int8"):
            if b.name.startswith(f"{name}-") and (name != "unet" or "sfconv" not in b.name):
                bundle = load_bundle(b)
                art = next((a for a in bundle.artifacts if a.backend == "tflite"), None)
                if art is not None:
                    files[f"{key}-int8"] = art.path
                    fp32 = art.path.parent / art.meta["float_file"]
                    if fp32.exists():
                        files[f"{key}-fp32"] = fp32
    if len(files) < 4:
        return {"error": f"missing files for the speed pairing: have {sorted(files)}"}
    calib = load_calibration("fundus-demo", (256, 256))
    lat = interleaved(files, calib.holdout[:1], work)
    ms = {k: v["median_ms"] for k, v in lat.items()}
    return {"latency": lat, "int8_speedup": ms["vanilla-int8"] / ms["sfconv-int8"],
            "fp32_speedup": ms["vanilla-fp32"] / ms["sfconv-fp32"],
            "sfconv_int8_vs_vanilla_fp32": ms["vanilla-fp32"] / ms["sfconv-int8"]}


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "## INT8: calibration vs quantization-aware fine-tuning",
        "",
        f"Demo pair, int8 bundles built with calibration only (QAT 0) and with `--qat {r['qat_steps']}`. Dice "
        "agreement = mask Dice of the artifact vs fp32 torch on the held-out crops and on the shifted (augmented) "
        "split; label Dice = Dice against the pseudo-labels on the held-out strip (fp32 torch in brackets).",
        "",
        "| target | model | QAT | backend | float layers | Dice held-out | Dice shifted | label Dice (fp32) | I/O | "
        "size | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, n: int = 4) -> str:
        return "-" if v is None else f"{v:.{n}f}"

    for b in r["builds"]:
        if "error" in b:
            lines.append(f"| {b['target']} | {b['model']} | {b['qat_steps']} | - | - | - | - | - | - | - | "
                         f"{b['seconds']} ({b['error'][:120]}) |")
            continue
        for a in b["artifacts"]:
            size = 512 if b["target"].startswith("jetson") else 256
            fp = r["fp32_label_dice"].get(f"{b['model']}@{size}")
            lines.append(f"| {b['target']} | {b['model']} | {b['qat_steps']} | {a['backend']} | {a['float_layers']} | "
                         f"{f(a['dice_holdout'])} | {f(a['dice_shifted'])} | {f(a['label_dice'], 3)} ({f(fp, 3)}) | "
                         f"{a['io']['input']}/{a['io']['output']} | {a['bytes'] / 1024:.0f} KiB | {b['seconds']} |")
    s = r.get("speed") or {}
    if "int8_speedup" in s:
        lines += ["", f"TFLite/XNNPACK on host-cpu (2 threads, QAT builds, interleaved medians): SFConv over vanilla "
                      f"{s['int8_speedup']:.2f}x in int8, {s['fp32_speedup']:.2f}x in fp32; SFConv int8 "
                      f"{s['sfconv_int8_vs_vanilla_fp32']:.2f}x faster than vanilla fp32."]
    elif s:
        lines += ["", f"speed pairing: {s.get('error')}"]
    return "\n".join(lines) + "\n"
