"""TensorRT backend (Jetson): lint, calibration cache, trtexec commands, engine build, engine cache, runner.

What runs where:

* on any machine (this workstation's CPU included): the ONNX export and its
  checks, INT8 quantization (Q/DQ and calibration ranges), the TensorRT rules
  lint (:mod:`.rules`), the calibration cache (:mod:`.calibration_cache`), the
  trtexec command per release (:mod:`.commands`), the GPU probe (:mod:`.gpu`),
  the engine-cache keys (:mod:`.engine_cache`) and :func:`make`, which writes
  a device folder when it cannot build the engine here;
* where TensorRT and the target's GPU are (the Jetson): :func:`build_engine`,
  :func:`build_from_folder` and :class:`TensorRTRunner`.

Nothing here imports ``tensorrt`` at import time, and nothing creates
TensorRT objects before a subprocess has confirmed a usable GPU
(:func:`detect_gpu`): without one, TensorRT crashes the process.
"""

from __future__ import annotations

from sfedge.backends.tensorrt.builder import BuildResult, build_engine
from sfedge.backends.tensorrt.calibration_cache import (
    calibration_cache_header,
    read_calibration_cache,
    write_calibration_cache,
)
from sfedge.backends.tensorrt.commands import DEFAULT_WORKSPACE_MB, trtexec_command, write_build_script
from sfedge.backends.tensorrt.engine_cache import EngineCache, engine_cache_key
from sfedge.backends.tensorrt.gpu import GpuInfo, detect_gpu
from sfedge.backends.tensorrt.rules import Violation, check_onnx, lint_onnx
from sfedge.backends.tensorrt.runner import RUNNER, TensorRTRunner
from sfedge.backends.tensorrt.stage import build_from_folder, make, read_plan

__all__ = [
    "RUNNER", "TensorRTRunner", "make", "build_from_folder", "read_plan",
    "lint_onnx", "check_onnx", "Violation",
    "write_calibration_cache", "read_calibration_cache", "calibration_cache_header",
    "trtexec_command", "write_build_script", "DEFAULT_WORKSPACE_MB",
    "detect_gpu", "GpuInfo", "EngineCache", "engine_cache_key", "build_engine", "BuildResult",
]
