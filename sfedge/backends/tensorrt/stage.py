"""The TensorRT stage: everything a Jetson needs to build its engine, and the engine where TensorRT is here.

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

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sfedge.backends.base import Artifact, ModelSource, TensorSpec
from sfedge.backends.tensorrt.calibration_cache import write_calibration_cache
from sfedge.backends.tensorrt.commands import DEFAULT_WORKSPACE_MB, trtexec_command, write_build_script
from sfedge.backends.tensorrt.engine_cache import EngineCache, engine_cache_key
from sfedge.backends.tensorrt.gpu import GpuInfo, detect_gpu
from sfedge.backends.tensorrt.rules import check_onnx, opset_range
from sfedge.backends.tensorrt.version import format_version, is_strongly_typed, parse_version
from sfedge.errors import BackendUnavailable, BundleError, ConfigError, ExportError
from sfedge.fileio import atomic_dir, atomic_path, sha256_file, write_json, write_text

__all__ = ["make", "build_from_folder", "read_plan", "FOLDER_FORMAT", "PLAN_FILE"]

FOLDER_FORMAT = "sfedge-tensorrt-device-folder/1"
PLAN_FILE = "build.json"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
FP32_ONNX, QDQ_ONNX, FP16_ONNX, CALIBRATION_CACHE = "model.onnx", "model.qdq.onnx", "model.fp16.onnx", "calibration.cache"
SCRIPT, README = "build_engine.sh", "BUILD_ON_DEVICE.md"
Progress = Callable[[str, "float | None"], None]


def _tell(progress: Progress | None, message: str, fraction: float | None) -> None:
    if progress is not None:
        progress(message, fraction)


def make(
    source: ModelSource,
    target: Any,
    precision: str,
    calibration: Any,
    workdir: str | Path,
    *,
    progress: Progress | None = None,
    method: str = "entropy",
    strongly_typed: bool | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    engine_cache: EngineCache | None = None,
) -> Artifact:
    """The TensorRT artifact for ``target`` at ``precision``: an engine if this machine can build it, else a device folder.

    Why a folder is a result, not a failure: engines are tied to the device's
    TensorRT release and GPU, so on a workstation without them the right
    product is everything the device needs to build the engine itself.
    ``method`` is the int8 calibration method; ``strongly_typed`` overrides the
    release's default (TensorRT 11: always; 10.x: off; 8.5: never).
    """
    from sfedge.export import DEFAULT_OPSET, export_onnx

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

    with atomic_dir(folder) as out:
        _tell(progress, f"exporting ONNX (opset {opset}) for TensorRT {trt}", 0.0)
        fp32 = export_onnx(source, out / FP32_ONNX, opset=opset, check_inputs=holdout,
                           progress=lambda m, f: _tell(progress, m, None if f is None else 0.3 * f))
        primary, qdq, parity = FP32_ONNX, False, dict(fp32.parity)
        if precision == "fp16" and strongly_typed is None and version[0] == 10 and _has_float_scopes(out / FP32_ONNX):
            # A weakly typed --fp16 build would run the NMF in fp16 (NaN, SEEDS.md); strongly typed keeps it fp32.
            typed = True
        parity_source: str | None = FP32_ONNX
        fallback: dict[str, Any] | None = None
        float_layers: list[str] = []
        meta: dict[str, Any] = {}
        if precision == "fp16" and typed:
            from sfedge.quantize.qdq import to_fp16

            half = to_fp16(fp32, out / FP16_ONNX)
            primary, parity, parity_source, float_layers = FP16_ONNX, {}, None, list(half.float_layers)
        elif precision == "fp16":
            parity, parity_source = {}, None  # TensorRT picks fp16 kernels at build time; nothing to run here
        elif precision == "int8":
            from sfedge.backends.base import check_parity
            from sfedge.quantize.ranges import compute_ranges
            from sfedge.quantize.sensitivity import mixed_precision

            ranges = compute_ranges(out / FP32_ONNX, calibration, method,
                                    progress=lambda m, f: _tell(progress, m, None if f is None else 0.3 + 0.1 * f))
            _check_all_int8(fp32, calibration, ranges, method, trt, typed)
            tolerance = target.tolerance("int8")
            qdq_art, report = mixed_precision(
                fp32, calibration, out / QDQ_ONNX, source.reference(holdout), tolerance, method=method,
                ranges=ranges, progress=lambda m, f: _tell(progress, m, None if f is None else 0.4 + 0.4 * f),
            )
            check_parity(_parity_of(qdq_art), tolerance, f"the int8 Q/DQ ONNX for {target.name}")
            if len(qdq_art.float_layers) >= int(qdq_art.meta.get("layers", 0)):
                raise ExportError(
                    f"int8 for {target.name} kept all {len(qdq_art.float_layers)} layers of {source.name} in float "
                    "to meet the int8 tolerance, so no layer would run in INT8",
                    "build fp16 instead, or loosen the target's [tolerances.int8]",
                )
            primary, qdq, parity, parity_source = QDQ_ONNX, True, dict(qdq_art.parity), QDQ_ONNX
            float_layers = list(qdq_art.float_layers)
            meta["mixed_precision"] = {"float_layers": float_layers, "met": report.met,
                                       "all_int8_parity": report.all_int8_parity}
            if not typed:  # implicit INT8 from the fp32 ONNX + cache: TensorRT <= 10, weakly typed builds only
                write_calibration_cache(ranges, out / CALIBRATION_CACHE, tensorrt_version=trt)
                fallback = {"onnx": FP32_ONNX, "calibration_cache": CALIBRATION_CACHE, "qdq": False}

        _tell(progress, f"checking the ONNX against TensorRT {trt}'s parser rules", 0.85)
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
            "trtexec": command, "lint": {"tensorrt": trt, "clean": linted}, "parity": parity,
            "parity_source": parity_source,
            "float_layers": float_layers, **meta,
        }
        write_json(out / PLAN_FILE, plan)
        write_text(out / README, _device_readme(plan, source.name, command))

    gpu = detect_gpu()
    why = gpu.mismatch(trt, int(sm)) if gpu is not None else "no TensorRT/GPU on this machine"
    if why is None:
        artifact = build_from_folder(folder, engine_cache=engine_cache, progress=progress, gpu=gpu)
        _check_engine(artifact, source, holdout, target, precision)
        return artifact
    note = (f"engine not built here: {why}; on the {target.name} run `sfedge build <this bundle folder>` "
            f"(or sh {SCRIPT} in {folder.name})")
    _tell(progress, note, 1.0)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    inputs = [TensorSpec.from_dict(t) for t in plan["inputs"]]
    outputs = [TensorSpec.from_dict(t) for t in plan["outputs"]]
    return Artifact(
        path=folder, backend="tensorrt", kind="device-folder", precision=precision, inputs=inputs, outputs=outputs,
        float_layers=float_layers, parity=parity, files=files, notes=[note],
        meta={k: plan[k] for k in ("target", "tensorrt", "sm", "strongly_typed", "onnx", "qdq", "parity_source")},
    )


def _check_all_int8(fp32: Artifact, calibration: Any, ranges: dict[str, float], method: str, trt: str,
                    typed: bool) -> None:
    """Lint the every-layer-int8 Q/DQ graph before the per-layer search (minutes): fail in a second instead.

    Mixed precision only removes Q/DQ pairs from this graph, so if it passes
    the rules, so does whatever the search settles on.
    """
    import tempfile

    from sfedge.quantize.qdq import quantize_qdq

    with tempfile.TemporaryDirectory(prefix="sfedge-trt-") as tmp:
        probe = quantize_qdq(fp32, calibration, Path(tmp) / QDQ_ONNX, method=method, ranges=ranges,
                             write_ranges_file=False)
        check_onnx(probe.path, tensorrt_version=trt, strongly_typed=typed, precision="int8")


def _has_float_scopes(onnx_path: Path) -> bool:
    """True when the graph has nodes that must stay float32 in an fp16 build (sfedge.quantize.qdq.FLOAT_SCOPES)."""
    import onnx

    from sfedge.quantize.qdq import FLOAT_SCOPES

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(scope in node.name for node in graph.node for scope in FLOAT_SCOPES)


def _parity_of(artifact: Artifact) -> Any:
    from sfedge.parity import Parity

    return Parity(**{k: artifact.parity[k] for k in ("max_abs", "mean_abs", "cosine", "dice_agreement",
                                                      "reference_range", "samples")})


def _check_engine(artifact: Artifact, source: ModelSource, holdout: Any, target: Any, precision: str) -> None:
    """Run the fresh engine on the held-out split and hold it to the target's tolerance."""
    from sfedge.backends.base import check_parity, measure_parity
    from sfedge.backends.tensorrt.runner import TensorRTRunner

    with TensorRTRunner(artifact.path) as runner:
        parity = measure_parity(runner, holdout, source.reference(holdout))
    artifact.parity = parity.as_dict()
    check_parity(parity, target.tolerance(precision), f"the TensorRT engine {artifact.path.name}")


def read_plan(folder: str | Path) -> dict[str, Any]:
    """The build.json of a device folder (BundleError when missing or not one)."""
    path = Path(folder) / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{folder} is not a TensorRT device folder ({PLAN_FILE}: {e})",
                          "give the folder `sfedge build` wrote for a Jetson target") from None
    if plan.get("format") != FOLDER_FORMAT:
        raise BundleError(f"{path} is not a {FOLDER_FORMAT} plan", "rebuild the folder with this sfedge version")
    return plan


def build_from_folder(
    folder: str | Path,
    *,
    use_fallback: bool = False,
    engine_cache: EngineCache | None = None,
    progress: Progress | None = None,
    gpu: GpuInfo | None = None,
) -> Artifact:
    """Build (or take from the engine cache) the engine a device folder describes, on this machine's GPU.

    Why on the device: the engine must be built by the TensorRT release and
    GPU that will run it.  Needs tensorrt and numpy, not torch.
    ``use_fallback`` builds implicit INT8 from the fp32 ONNX and the
    calibration cache instead of the Q/DQ ONNX (TensorRT <= 10).
    """
    from sfedge.backends.tensorrt.builder import build_engine

    folder = Path(folder)
    plan = read_plan(folder)
    gpu = gpu or detect_gpu()
    why = gpu.mismatch(plan["tensorrt"], plan["sm"]) if gpu is not None else "no CUDA GPU with TensorRT here"
    if why is not None:
        raise BackendUnavailable(f"cannot build the engine in {folder.name} on this machine: {why}",
                                 f"run it on a {plan['target']} device, or run {SCRIPT} there")
    step = plan.get("fallback") if use_fallback else plan
    if step is None:
        raise ConfigError(f"{folder.name} has no implicit-INT8 alternative", "build the primary ONNX")
    onnx_name, cache_name = step["onnx"], step.get("calibration_cache")
    for name in filter(None, (onnx_name, cache_name)):
        if sha256_file(folder / name) != plan["sha256"].get(name):
            raise BundleError(f"{folder / name} does not match {PLAN_FILE}", "copy the whole folder again")
    shapes = {t["name"]: t["shape"] for t in plan["inputs"]}
    options = {"strongly_typed": plan["strongly_typed"], "workspace_mb": plan["workspace_mb"],
               "implicit_int8_cache": plan["sha256"].get(cache_name) if cache_name else None, "tf32": False}
    key = engine_cache_key(onnx_sha256=plan["sha256"][onnx_name], tensorrt_version=gpu.tensorrt, gpu_name=gpu.name,
                           sm=gpu.sm, precision=plan["precision"], input_shapes=shapes, builder_options=options)
    cache = engine_cache or EngineCache()
    engine = folder / plan["engine"]
    cached = cache.lookup(key)
    meta: dict[str, Any] = {"tensorrt": gpu.tensorrt, "gpu": gpu.name, "sm": gpu.sm, "engine_cache_key": key,
                            "from_cache": cached is not None, "target": plan["target"]}
    if cached is not None:
        _tell(progress, f"engine found in the cache ({key[:12]})", 1.0)
        with atomic_path(engine) as tmp:
            shutil.copyfile(cached, tmp)
    else:
        result = build_engine(folder / onnx_name, engine, precision=plan["precision"],
                              calibration_cache=folder / cache_name if cache_name else None,
                              timing_cache=folder / plan["timing_cache"], workspace_mb=plan["workspace_mb"],
                              strongly_typed=plan["strongly_typed"], progress=progress)
        meta["build"] = result.as_dict()
        cache.store(key, engine, {"onnx_sha256": plan["sha256"][onnx_name], "tensorrt": gpu.tensorrt,
                                  "gpu": gpu.name, "sm": gpu.sm, "precision": plan["precision"],
                                  "input_shapes": shapes, "builder_options": options})
    files = sorted(p for p in folder.iterdir() if p.is_file() and p != engine)
    return Artifact(
        path=engine, backend="tensorrt", kind="engine", precision=plan["precision"],
        inputs=[TensorSpec.from_dict(t) for t in plan["inputs"]],
        outputs=[TensorSpec.from_dict(t) for t in plan["outputs"]],
        float_layers=list(plan.get("float_layers", [])), files=files, meta=meta,
    )


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
        "or, with only numpy and TensorRT's Python bindings installed, from this folder:",
        "",
        "    python3 -m sfedge.backends.tensorrt .",
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
                     "(the commented alternative in the script; `python3 -m sfedge.backends.tensorrt . --fallback`)")
    if plan["onnx"] == FP16_ONNX:
        lines.append(f"- `{FP16_ONNX}`: fp16 graph with float32 I/O (strongly typed builds take precision "
                     "from the ONNX)")
    lines += [f"- `{PLAN_FILE}`: the build plan, file hashes and the lint results", ""]
    return "\n".join(lines)
