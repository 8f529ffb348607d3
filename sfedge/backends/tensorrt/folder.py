"""A TensorRT device folder on the device: read its plan and build its engine there (device side: no torch).

The workstation writes the folder (:mod:`.make`); on the Jetson,
:func:`build_from_folder` checks the device's TensorRT release and GPU,
re-hashes the ONNX it builds from, and builds the engine through the engine
cache (:mod:`.engine_cache`) with :func:`sfedge.backends.tensorrt.builder.build_engine`.
Needs numpy, Polygraphy and TensorRT's Python bindings only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sfedge.artifact import Artifact, TensorSpec
from sfedge.backends.tensorrt.builder import build_engine, build_options
from sfedge.backends.tensorrt.engine_cache import EngineCache, engine_cache_key
from sfedge.backends.tensorrt.gpu import GpuInfo, detect_gpu
from sfedge.errors import BackendUnavailable, BundleError, ConfigError, MalformedBundleError
from sfedge.fileio import atomic_path, read_json_bytes, read_limited, sha256_file
from sfedge.manifest import confined
from sfedge.progress import Progress, tell

__all__ = [
    "read_plan", "build_from_folder", "FOLDER_FORMAT", "PLAN_FILE", "ENGINE_FILE", "TIMING_CACHE_FILE", "FP32_ONNX",
    "QDQ_ONNX", "FP16_ONNX", "CALIBRATION_CACHE", "SCRIPT", "README",
]

FOLDER_FORMAT = "sfedge-tensorrt-device-folder/1"
PLAN_FILE = "build.json"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
FP32_ONNX, QDQ_ONNX, FP16_ONNX, CALIBRATION_CACHE = "model.onnx", "model.qdq.onnx", "model.fp16.onnx", "calibration.cache"
SCRIPT, README = "build_engine.sh", "BUILD_ON_DEVICE.md"


MAX_PLAN_BYTES = 1 << 20


def read_plan(folder: str | Path) -> dict[str, Any]:
    """The build.json of a device folder (MalformedBundleError when missing, not one, or naming paths outside it).

    Every file name the plan gives (ONNX, calibration cache, engine, timing
    cache) must stay inside the folder: the engine build writes the engine
    and timing cache there, so a crafted plan must not choose where.
    """
    path = Path(folder) / PLAN_FILE
    hint = "give the folder `sfedge build` wrote for a Jetson target"
    if not path.is_file():
        raise MalformedBundleError(f"{folder} is not a TensorRT device folder (no {PLAN_FILE})", hint)
    plan: Any = read_json_bytes(read_limited(path, MAX_PLAN_BYTES, MalformedBundleError, hint), path, MalformedBundleError,
                           hint)
    if not isinstance(plan, dict) or plan.get("format") != FOLDER_FORMAT:
        raise MalformedBundleError(f"{path} is not a {FOLDER_FORMAT} plan", "rebuild the folder with this sfedge version")
    for key in ("onnx", "engine", "timing_cache"):
        confined(folder, plan.get(key), f"{PLAN_FILE} '{key}'")
    if plan.get("calibration_cache") is not None:
        confined(folder, plan["calibration_cache"], f"{PLAN_FILE} 'calibration_cache'")
    fallback = plan.get("fallback")
    if fallback is not None:
        if not isinstance(fallback, dict):
            raise MalformedBundleError(f"{path}: 'fallback' is not a table", hint)
        for key in ("onnx", "calibration_cache"):
            if fallback.get(key) is not None:
                confined(folder, fallback[key], f"{PLAN_FILE} 'fallback.{key}'")
    if not isinstance(plan.get("sha256"), dict):
        raise MalformedBundleError(f"{path}: 'sha256' is not a table", hint)
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
    folder = Path(folder)
    plan = read_plan(folder)
    gpu = gpu or detect_gpu()
    why = gpu.mismatch(plan["tensorrt"], plan["sm"]) if gpu is not None else "no CUDA GPU with TensorRT here"
    if gpu is None or gpu.tensorrt is None or why is not None:
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
               "implicit_int8_cache": plan["sha256"].get(cache_name) if cache_name else None,
               "tf32": build_options(gpu.tensorrt, plan["precision"], plan["strongly_typed"]).tf32}
    key = engine_cache_key(onnx_sha256=plan["sha256"][onnx_name], tensorrt_version=gpu.tensorrt, gpu_name=gpu.name,
                           sm=gpu.sm, precision=plan["precision"], input_shapes=shapes, builder_options=options)
    cache = engine_cache or EngineCache()
    engine = folder / plan["engine"]
    cached = cache.lookup(key)
    meta: dict[str, Any] = {"tensorrt": gpu.tensorrt, "gpu": gpu.name, "sm": gpu.sm, "engine_cache_key": key,
                            "from_cache": cached is not None, "target": plan["target"]}
    if cached is not None:
        tell(progress, f"engine found in the cache ({key[:12]})", 1.0)
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
