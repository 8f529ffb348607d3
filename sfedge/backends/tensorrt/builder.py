"""Build a TensorRT engine from an ONNX file with TensorRT's Python API (8.5, 10.x and 11.x).

Runs where TensorRT and a GPU are (a Jetson, or a workstation with the target's
GPU); :func:`sfedge.backends.tensorrt.gpu.detect_gpu` must have said yes before
this is called, because creating TensorRT objects without a GPU crashes the
process.  ``tensorrt`` is imported inside :func:`build_engine`.

The API differences handled here, and where they are documented:

* network creation: ``EXPLICIT_BATCH`` is required for ONNX on 8.x and
  ignored/deprecated from 10.0 ("[DEPRECATED] Ignored because networks are
  always explicit batch in TensorRT 10.0", Python API Builder docs);
  ``STRONGLY_TYPED`` exists from 9.x/10.0 and is "accepted but ignored" on 11
  (always strongly typed).  Polygraphy's ``CreateNetwork`` does the same
  (backend/trt/loader.py: EXPLICIT_BATCH only below 10.0).
* precision: ``BuilderFlag.FP16``/``INT8`` exist up to 10.x and were removed
  in 11 ("TensorRT 11.x removes all precision-enabling builder flags");
  ``BuilderFlag.TF32`` remains and is on by default, so FP32 builds clear it.
* implicit INT8: an ``IInt8EntropyCalibrator2`` subclass whose
  ``read_calibration_cache`` returns the cache and ``get_batch`` returns None
  (no calibration data on the device).  The subclass must call the base
  ``__init__`` explicitly (Polygraphy backend/trt/calibrator.py: "Must
  explicitly initialize parent for any trampoline class! Will mysteriously
  segfault without this").  Calibrators are deprecated in 10.1 and removed in 11.
  Polygraphy only attaches the calibrator when the network has no Q/DQ layers;
  so do we.
* workspace: ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``
  (8.4+; ``max_workspace_size`` is gone in 10).
* timing cache: ``config.create_timing_cache(bytes)`` + ``set_timing_cache(cache,
  ignore_mismatch=False)`` before the build, ``config.get_timing_cache().serialize()``
  after (Polygraphy CreateConfig / EngineBytesFromNetwork).
* ``builder.build_serialized_network`` (8.0+; ``build_engine`` was removed in 10).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sfedge.backends.tensorrt.calibration_cache import parse_calibration_cache, retarget_calibration_cache
from sfedge.backends.tensorrt.commands import DEFAULT_WORKSPACE_MB, PRECISIONS
from sfedge.backends.tensorrt.version import format_version, is_strongly_typed, parse_version
from sfedge.errors import BackendUnavailable, ConfigError, ExportError
from sfedge.fileio import atomic_path

__all__ = ["EngineBuild", "build_engine"]

Progress = Callable[[str, "float | None"], None]

# Calibrator base class per cache-header algorithm name.
_CALIBRATORS = {
    "EntropyCalibration2": "IInt8EntropyCalibrator2",
    "EntropyCalibration": "IInt8EntropyCalibrator",
    "MinMaxCalibration": "IInt8MinMaxCalibrator",
    "LegacyCalibration": "IInt8LegacyCalibrator",
}


@dataclass
class EngineBuild:
    """What one engine build produced and how."""

    engine_path: Path
    tensorrt: str
    precision: str
    strongly_typed: bool
    implicit_int8: bool
    seconds: float
    engine_bytes: int
    timing_cache: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["engine_path"] = str(self.engine_path)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return d


def _make_cache_calibrator(trt: Any, cache: bytes, algorithm: str) -> Any:
    """A calibrator that only replays ``cache``: TensorRT reads the scales and never asks for a batch."""
    base = getattr(trt, _CALIBRATORS[algorithm])

    class CacheCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # required for pybind trampolines (see module docstring)
            self._cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return self._cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None

        if algorithm == "LegacyCalibration":
            def get_quantile(self) -> float:
                return 0.5

            def get_regression_cutoff(self) -> float:
                return 0.5

            def read_histogram_cache(self, length: int) -> None:
                return None

            def write_histogram_cache(self, ptr: int, length: int) -> None:
                return None

    return CacheCalibrator()


def _parser_errors(parser: Any) -> str:
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node_name() if hasattr(err, "node_name") else err.node()
        msgs.append(f"node {node}: {err.desc()}")
    return "; ".join(msgs) or "no details"


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    precision: str,
    calibration_cache: str | os.PathLike[str] | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    strongly_typed: bool | None = None,
    progress: Progress | None = None,
) -> EngineBuild:
    """Build and serialize an engine for this machine's GPU; write it (and the timing cache) atomically.

    Why here and not on the workstation: an engine is tied to the exact
    TensorRT release and GPU architecture that built it.  ``precision`` is
    fp32, fp16 or int8; an int8 build uses the ONNX's Q/DQ nodes when it has
    them, else the scales in ``calibration_cache`` (implicit INT8, TensorRT <= 10).
    ``timing_cache`` is read if it exists and written back after the build,
    so the next build of a similar network is faster.
    """
    report = progress or (lambda message, fraction: None)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file {onnx_path} does not exist", "export the model first")
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailable(
            "TensorRT's Python bindings are not installed here",
            "on a Jetson install JetPack's python3-libnvinfer, or build with build_engine.sh (trtexec)",
        ) from err

    version = parse_version(trt.__version__)
    typed = is_strongly_typed(version, strongly_typed)
    v = format_version(version)
    t0 = time.perf_counter()
    report(f"parsing {onnx_path.name} (TensorRT {v})", 0.0)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if version[0] < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if typed and version[0] < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = (parser.parse_from_file(str(onnx_path)) if hasattr(parser, "parse_from_file")
              else parser.parse(onnx_path.read_bytes()))
    if not parsed:
        raise ExportError(f"TensorRT {v} cannot parse {onnx_path.name}: {_parser_errors(parser)}",
                          "run lint_onnx on the file for this TensorRT release")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    has_qdq = any(
        network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE) for i in range(network.num_layers)
    )
    implicit_int8 = precision == "int8" and not has_qdq
    if implicit_int8 and (typed or calibration_cache is None):
        raise ConfigError(
            f"{onnx_path.name} has no Q/DQ nodes, so an int8 build needs "
            + ("a weakly typed TensorRT <= 10 build and " if typed else "") + "a calibration cache",
            "build from the Q/DQ ONNX, or pass the calibration cache written for this model",
        )
    if not typed:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if implicit_int8:
        data = Path(calibration_cache).read_bytes()  # type: ignore[arg-type]
        header, _ = parse_calibration_cache(data.decode())
        algorithm = header.rsplit("-", 1)[-1]
        if algorithm not in _CALIBRATORS:
            raise ConfigError(f"calibration cache algorithm '{algorithm}' has no TensorRT calibrator",
                              f"write the cache with one of {', '.join(_CALIBRATORS)}")
        config.int8_calibrator = _make_cache_calibrator(trt, retarget_calibration_cache(data, v), algorithm)

    timing_path = Path(timing_cache) if timing_cache is not None else None
    previous = timing_path.read_bytes() if timing_path is not None and timing_path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(previous), ignore_mismatch=False):
        # A cache from another device or release: start a fresh one rather than reuse wrong timings.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    report(f"building {precision} engine (minutes on a Jetson)", 0.1)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {v} failed to build an engine from {onnx_path.name}",
                          "see TensorRT's log above; try a larger workspace or another precision")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if timing_path is not None:
        with atomic_path(timing_path) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0
    report(f"engine written: {engine_path.name} in {seconds:.0f} s", 1.0)
    return EngineBuild(engine_path, trt.__version__, precision, typed, implicit_int8, seconds,
                       engine_path.stat().st_size, timing_path)
