"""TensorRT, build side: everything a Jetson needs to build its engine, and the engine where TensorRT is here.

``make`` exports the ONNX (checked against torch), quantizes it for int8
(explicit Q/DQ with per-layer mixed precision, plus TensorRT's calibration
cache for implicit INT8 on TensorRT <= 10), converts it to fp16 where the
build is strongly typed, lints every ONNX for the target's TensorRT release,
and writes a device folder:

    model.onnx              fp32 export (always)
    model.qdq.onnx          int8: explicit Q/DQ (what the primary command builds)
    calibration.cache       int8, TensorRT <= 10: implicit-INT8 alternative from model.onnx
    model.fp16.onnx         fp16 on a strongly typed build (TensorRT 11; 10 with strongly_typed=True)
    build_engine.sh         the exact trtexec command for the target's TensorRT release
    build.json              what to build and how (read by build_from_folder on the device)
    BUILD_ON_DEVICE.md      how to build the engine on the device

Then, only if a subprocess finds a GPU whose TensorRT release and SM match
the target, it builds ``model.engine`` (through the engine cache) and checks
its parity; otherwise the folder is the artifact (kind ``device-folder``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from sfedge.artifact import Artifact, TensorSpec
from sfedge.backends.int8 import Int8Options, qdq_int8
from sfedge.backends.onnxruntime.make import ort_scorer
from sfedge.backends.tensorrt.calibration_cache import write_calibration_cache
from sfedge.backends.tensorrt.commands import DEFAULT_WORKSPACE_MB, trtexec_command, write_build_script
from sfedge.backends.tensorrt.engine_cache import EngineCache
from sfedge.backends.tensorrt.folder import (
    CALIBRATION_CACHE,
    ENGINE_FILE,
    FOLDER_FORMAT,
    FP16_ONNX,
    FP32_ONNX,
    PLAN_FILE,
    QDQ_ONNX,
    README,
    SCRIPT,
    TIMING_CACHE_FILE,
    build_from_folder,
)
from sfedge.backends.tensorrt.gpu import detect_gpu
from sfedge.backends.tensorrt.rules import check_onnx, opset_range
from sfedge.backends.tensorrt.runner import TensorRTRunner
from sfedge.backends.tensorrt.version import format_version, is_strongly_typed, parse_version
from sfedge.calibration import CalibrationSet
from sfedge.errors import ConfigError, ExportError
from sfedge.export import DEFAULT_OPSET, export_onnx
from sfedge.fileio import atomic_dir, sha256_file, write_json, write_text
from sfedge.parity import gate, measure
from sfedge.progress import Progress, scaled, tell
from sfedge.quantize.qdq import FLOAT_SCOPES, quantize_qdq, to_fp16
from sfedge.quantize.ranges import compute_ranges
from sfedge.source import ModelSource
from sfedge.targets import Target

__all__ = ["make"]


def make(
    source: ModelSource,
    target: Target,
    precision: str,
    calibration: CalibrationSet,
    workdir: Path,
    *,
    progress: Progress | None = None,
    method: str = "entropy",
    strongly_typed: bool | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    engine_cache: EngineCache | None = None,
    int8: Int8Options | None = None,
) -> Artifact:
    """The TensorRT artifact for ``target`` at ``precision``: an engine if this machine can build it, else a device folder.

    Why a folder is a result, not a failure: engines are tied to the device's
    TensorRT release and GPU, so on a workstation without them the right
    product is everything the device needs to build the engine itself.
    ``method`` is the int8 calibration method; ``strongly_typed`` overrides the
    release's default (TensorRT 11: always; 10.x: off; 8.5: never).  Every
    ONNX in the folder is gated against torch in ONNX Runtime (the fp32 export
    and the int8 Q/DQ graph, which ONNX Runtime computes the way TensorRT's
    int8 kernels approximate it) with the target's own tolerances.
    """
    if "tensorrt" not in target.backends:
        raise ConfigError(f"target {target.name} does not build TensorRT engines", "pick a Jetson target")
    target.check_precision(precision)
    trt = target.tensorrt_version
    sm = target.device.get("sm")
    if trt is None or sm is None:
        raise ConfigError(f"target {target.name} has no device.tensorrt / device.sm", "add them to its TOML file")
    version = parse_version(trt)
    typed = is_strongly_typed(version, strongly_typed)
    opset = min(DEFAULT_OPSET, opset_range(trt)[1])
    folder = Path(workdir) / f"{source.name}-{source.weights_sha256[:8]}-tensorrt-{precision}"
    holdout = calibration.holdout
    reference = source.reference(holdout)
    score = ort_scorer(task=source.task)

    with atomic_dir(folder) as out:
        tell(progress, f"exporting ONNX (opset {opset}) for TensorRT {trt}", 0.0)
        fp32 = export_onnx(source, out / FP32_ONNX, score=score, opset=opset, check_inputs=holdout,
                           tolerance=target.tolerance("fp32"), progress=scaled(progress, 0.0, 0.3))
        primary, qdq, parity = FP32_ONNX, False, fp32.parity
        if precision == "fp16" and strongly_typed is None and version[0] == 10 and _has_float_scopes(out / FP32_ONNX):
            # A weakly typed --fp16 build would run the NMF in fp16 (NaN: its eps underflows); strongly typed keeps it fp32.
            typed = True
        parity_source: str | None = FP32_ONNX
        fallback: dict[str, Any] | None = None
        float_layers: list[str] = []
        meta: dict[str, Any] = {}
        shifted_parity = None
        if precision == "fp16" and typed:
            half = to_fp16(fp32, out / FP16_ONNX)
            primary, parity, parity_source, float_layers = FP16_ONNX, None, None, list(half.float_layers)
        elif precision == "fp16":
            parity, parity_source = None, None  # TensorRT picks fp16 kernels at build time; nothing to run here
        elif precision == "int8":
            ranges = compute_ranges(out / FP32_ONNX, calibration, method, progress=scaled(progress, 0.3, 0.1))
            _check_all_int8(fp32, calibration, ranges, method, trt, typed)
            tolerance = target.tolerance("int8")
            qdq_art, result, _ = qdq_int8(source, fp32, calibration, out / QDQ_ONNX, tolerance=tolerance,
                                          fp32_tolerance=target.tolerance("fp32"), score=score,
                                          options=int8 or Int8Options(), progress=scaled(progress, 0.4, 0.4))
            assert qdq_art.parity is not None
            gate(qdq_art.parity, tolerance, f"the int8 Q/DQ ONNX for {target.name}")
            if calibration.has_shifted:
                assert calibration.shifted is not None
                shifted_parity = gate(score(out / QDQ_ONNX, calibration.shifted, source.reference(calibration.shifted)),
                                      tolerance.for_shifted(), f"the int8 Q/DQ ONNX for {target.name}",
                                      split="shifted held-out")
            if len(qdq_art.float_layers) >= result.layers:
                raise ExportError(
                    f"int8 for {target.name} kept all {len(qdq_art.float_layers)} layers of {source.name} in float "
                    "to meet the int8 tolerance, so no layer would run in INT8",
                    "build fp16 instead, or loosen the target's [tolerances.int8]",
                )
            primary, qdq, parity, parity_source = QDQ_ONNX, True, qdq_art.parity, QDQ_ONNX
            float_layers = list(qdq_art.float_layers)
            meta["mixed_precision"] = {"float_layers": float_layers, "met": result.met,
                                       "all_int8_parity": result.all_int8_parity.as_dict(),
                                       "float_cost": result.float_cost, "total_cost": result.total_cost,
                                       "method": qdq_art.meta["mixed_precision"]["method"],
                                       "methods": qdq_art.meta["mixed_precision"]["methods"]}
            if "qat" in qdq_art.meta:
                meta["qat"] = qdq_art.meta["qat"]
            if not typed:  # implicit INT8 from the fp32 ONNX + cache: TensorRT <= 10, weakly typed builds only
                write_calibration_cache(ranges, out / CALIBRATION_CACHE, tensorrt_version=trt)
                fallback = {"onnx": FP32_ONNX, "calibration_cache": CALIBRATION_CACHE, "qdq": False}

        tell(progress, f"checking the ONNX against TensorRT {trt}'s parser rules", 0.85)
        linted = sorted({FP32_ONNX, primary})
        for name in linted:
            check_onnx(out / name, tensorrt_version=trt, strongly_typed=typed,
                       precision=precision if name == primary else None)

        command = trtexec_command(primary, ENGINE_FILE, tensorrt_version=trt, precision=precision, qdq=qdq,
                                  timing_cache=TIMING_CACHE_FILE, workspace_mb=workspace_mb, strongly_typed=typed)
        alternatives = []
        if fallback is not None:
            alt = trtexec_command(FP32_ONNX, ENGINE_FILE, tensorrt_version=trt, precision="int8",
                                  calibration_cache=CALIBRATION_CACHE, timing_cache=TIMING_CACHE_FILE,
                                  workspace_mb=workspace_mb)
            fallback["trtexec"] = alt
            alternatives.append(("Alternative: implicit INT8 from the fp32 ONNX and the calibration cache "
                                 "(deprecated in TensorRT 10, removed in 11)", alt))
        title = (f"Build the {precision} TensorRT engine of {source.name} for {target.name} "
                 f"(sm_{sm}, TensorRT {trt})")
        write_build_script(out / SCRIPT, command, tensorrt_version=trt, title=title, alternatives=alternatives)
        plan = {
            "format": FOLDER_FORMAT, "model": source.name, "weights_sha256": source.weights_sha256,
            "target": target.name, "tensorrt": trt, "sm": int(sm), "jetpack": target.device.get("jetpack"),
            "precision": precision, "strongly_typed": typed, "workspace_mb": int(workspace_mb),
            "onnx": primary, "qdq": qdq, "calibration_cache": None,
            "fallback": fallback, "engine": ENGINE_FILE, "timing_cache": TIMING_CACHE_FILE,
            "inputs": [t.as_dict() for t in fp32.inputs], "outputs": [t.as_dict() for t in fp32.outputs],
            "sha256": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.suffix in (".onnx", ".cache")},
            "trtexec": command, "lint": {"tensorrt": trt, "clean": linted},
            "parity": parity.as_dict() if parity else {}, "parity_source": parity_source,
            "float_layers": float_layers, **meta,
            "shifted_parity": shifted_parity.as_dict() if shifted_parity else {},
        }
        write_json(out / PLAN_FILE, plan)
        write_text(out / README, _device_readme(plan, source.name, command))

    gpu = detect_gpu()
    why = gpu.mismatch(trt, int(sm)) if gpu is not None else "no TensorRT/GPU on this machine"
    if gpu is not None and why is None:
        engine = build_from_folder(folder, engine_cache=engine_cache, progress=progress, gpu=gpu)
        with TensorRTRunner(engine.path) as runner:
            engine.parity = measure(runner, holdout, reference, source.task)
        gate(engine.parity, target.tolerance(precision), f"the TensorRT engine {engine.path.name}",
             cleanup=[engine.path])
        return engine
    note = (f"engine not built here: {why}; on the {target.name} run `sfedge build <this bundle folder>` "
            f"(or sh {SCRIPT} in {folder.name})")
    tell(progress, note, 1.0)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return Artifact(
        path=folder, backend="tensorrt", kind="device-folder", precision=precision,
        inputs=[TensorSpec.from_dict(t) for t in plan["inputs"]],
        outputs=[TensorSpec.from_dict(t) for t in plan["outputs"]],
        float_layers=float_layers, parity=parity, files=files, notes=[note], shifted_parity=shifted_parity,
        meta={k: plan[k] for k in ("target", "tensorrt", "sm", "strongly_typed", "onnx", "qdq", "parity_source")},
    )


def _check_all_int8(fp32: Artifact, calibration: CalibrationSet, ranges: dict[str, float], method: str, trt: str,
                    typed: bool) -> None:
    """Lint the every-layer-int8 Q/DQ graph before the per-layer search (minutes): fail in a second instead.

    Mixed precision only removes Q/DQ pairs from this graph, so if it passes
    the rules, so does whatever the search settles on.
    """
    with tempfile.TemporaryDirectory(prefix="sfedge-trt-") as tmp:
        probe = quantize_qdq(fp32, calibration, Path(tmp) / QDQ_ONNX, method=method, ranges=ranges,
                             write_ranges_file=False)
        check_onnx(probe.path, tensorrt_version=trt, strongly_typed=typed, precision="int8")


def _has_float_scopes(onnx_path: Path) -> bool:
    """True when the graph has nodes that must stay float32 in an fp16 build (sfedge.quantize.qdq.FLOAT_SCOPES)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(scope in node.name for node in graph.node for scope in FLOAT_SCOPES)


def _device_readme(plan: dict[str, Any], model: str, command: list[str]) -> str:
    """BUILD_ON_DEVICE.md: what the folder holds and the two ways to build the engine there."""
    v = format_version(parse_version(plan["tensorrt"]))
    jetpack = f" (JetPack {plan['jetpack']})" if plan.get("jetpack") else ""
    lines = [
        f"# Build the TensorRT engine on the {plan['target']}",
        "",
        f"This folder holds everything needed to build the {plan['precision']} engine of `{model}` for "
        f"TensorRT {v}{jetpack}, sm_{plan['sm']}. An engine only loads on the TensorRT release and GPU that built "
        "it, so it is built on the device. Check the device's release first:",
        "",
        "    python3 -c \"import tensorrt; print(tensorrt.__version__)\"   # or: dpkg -l | grep nvinfer",
        "",
        "## With trtexec (no Python packages needed)",
        "",
        f"    sh {SCRIPT}",
        "",
        "runs (trtexec from $TRTEXEC, PATH or /usr/src/tensorrt/bin/trtexec):",
        "",
        "    " + " ".join(command),
        "",
        f"It writes `{plan['engine']}` and a timing cache `{plan['timing_cache']}` that makes later builds faster.",
        "",
        "## With sfedge (engine cache, parity check)",
        "",
        "    sfedge build ..            # from inside this folder: the bundle folder above it",
        "",
        "(builds the engine, checks it against the torch outputs the bundle carries, and records it in the "
        "bundle's manifest; needs `pip install 'sfedge[runtime]'` and JetPack's TensorRT, not torch)",
        "",
        "or, with only numpy, Polygraphy and TensorRT's Python bindings installed, from outside the bundle "
        "(`python3 -m` imports modules from the working folder first, so never run it inside a bundle):",
        "",
        "    cd ~ && python3 -m sfedge.backends.tensorrt /path/to/this/folder",
        "",
        "## Files",
        "",
        f"- `{plan['onnx']}`: the ONNX the engine is built from"
        + (" (explicit Q/DQ int8)" if plan["qdq"] else "")
        + (", the fp32 export checked against torch" if plan["onnx"] == FP32_ONNX else "")
        + "; checked against TensorRT's parser rules",
    ]
    if plan["onnx"] != FP32_ONNX:
        lines.append(f"- `{FP32_ONNX}`: the fp32 export, checked against torch")
    if plan.get("fallback"):
        lines.append(f"- `{CALIBRATION_CACHE}`: TensorRT's calibration cache for implicit INT8 from `{FP32_ONNX}` "
                     "(the commented alternative in the script; `python3 -m sfedge.backends.tensorrt FOLDER --fallback`, "
                     "run from outside the bundle)")
    if plan["onnx"] == FP16_ONNX:
        lines.append(f"- `{FP16_ONNX}`: fp16 graph with float32 I/O (strongly typed builds take precision "
                     "from the ONNX)")
    lines += [f"- `{PLAN_FILE}`: the build plan, file hashes and the lint results", ""]
    return "\n".join(lines)
