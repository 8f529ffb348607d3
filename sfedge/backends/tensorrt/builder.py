"""Build a TensorRT engine from an ONNX file through Polygraphy's TensorRT loaders (TensorRT 8.5, 10.x, 11.x).

Runs where TensorRT and a GPU are (a Jetson, or a workstation with the target's
GPU); :func:`sfedge.backends.tensorrt.gpu.detect_gpu` must have said yes before
this is called, because creating TensorRT objects without a GPU crashes the
process.  ``tensorrt`` and ``polygraphy.backend.trt`` are imported inside
:func:`build_engine`.

What Polygraphy does (``polygraphy.backend.trt``, 0.53; NVIDIA's own code,
tested against each TensorRT release, which matters because sfedge cannot run
TensorRT itself):

* ``NetworkFromOnnxPath``: the builder, the network (``EXPLICIT_BATCH`` only
  below 10.0, ``STRONGLY_TYPED`` when asked), the ONNX parser
  (``parse_from_file``, so external weights resolve) and its error report;
* ``CreateConfig``: the TF32/FP16/INT8 builder flags (TF32 cleared unless
  asked for), the workspace memory pool, the timing cache it loads, and the
  INT8 calibrator, which it attaches only when the network has no Q/DQ layers;
* ``Calibrator(data_loader=[], cache=FILE, BaseClass=...)``: implicit INT8 from
  a calibration cache alone.  TensorRT reads the scales from the cache and
  never asks for a batch; if it does (a cache it rejects), the empty loader
  yields nothing and the build fails instead of calibrating on no data;
* ``EngineBytesFromNetwork``: ``build_serialized_network`` and saving the
  timing cache, merged with what the file held.

What sfedge still does itself, because Polygraphy has no notion of it:

* which options to ask for per TensorRT release and precision
  (:func:`build_options`): TensorRT 11 has no precision flags (always strongly
  typed), 10.x takes ``STRONGLY_TYPED`` or flags, 8.5 only flags; TF32 as
  trtexec does it (off for fp32 builds only);
* refusing an int8 build that would not be int8: no Q/DQ layers and no
  calibration cache (or a strongly typed build, which has no implicit INT8).
  Polygraphy only warns and builds a float engine;
* the calibrator class named by the cache header, and the header relabelled
  for the device's release (TensorRT ignores a cache from another release);
* a timing cache TensorRT rejects (from another device or release) replaced by
  a fresh one: Polygraphy ignores ``set_timing_cache``'s result, which would
  build without a cache and save none;
* writing the engine and the timing cache atomically (Polygraphy writes the
  cache in place and leaves a ``.lock`` file beside it), and
  ``PolygraphyException`` as sfedge's one-line errors (:mod:`.loaders`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfedge.backends.tensorrt.calibration_cache import parse_calibration_cache, retarget_calibration_cache
from sfedge.backends.tensorrt.commands import DEFAULT_WORKSPACE_MB, PRECISIONS
from sfedge.backends.tensorrt.loaders import polygraphy_session, require_tensorrt
from sfedge.backends.tensorrt.version import format_version, is_strongly_typed, parse_version
from sfedge.errors import ConfigError, ExportError
from sfedge.fileio import atomic_path

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["EngineBuild", "BuildOptions", "build_options", "build_engine", "CALIBRATORS"]

Progress = Callable[[str, "float | None"], None]

# TensorRT's calibrator class per cache-header algorithm name (TensorRT <= 10; 11 removed calibrators).
CALIBRATORS = {
    "EntropyCalibration2": "IInt8EntropyCalibrator2",
    "EntropyCalibration": "IInt8EntropyCalibrator",
    "MinMaxCalibration": "IInt8MinMaxCalibrator",
    "LegacyCalibration": "IInt8LegacyCalibrator",
}


@dataclass(frozen=True)
class BuildOptions:
    """What sfedge asks Polygraphy (and so TensorRT) for, for one release and precision."""

    strongly_typed: bool  # precision comes from the ONNX's own types
    strongly_typed_flag: bool  # ask for NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x; 11 always is)
    tf32: bool
    fp16: bool
    int8: bool
    workspace_bytes: int


def build_options(version: str | tuple[int, ...], precision: str, strongly_typed: bool | None = None,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB) -> BuildOptions:
    """The builder options for ``precision`` on TensorRT ``version``, the same choices trtexec_command makes.

    Why here and not in Polygraphy: which flags exist is a per-release fact
    (TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``; Polygraphy fails when
    asked for a flag the release lacks) and TF32 is sfedge's parity policy.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if workspace_mb <= 0:
        raise ConfigError(f"bad workspace size {workspace_mb} MiB", "give a positive size in MiB")
    major = parse_version(version)[0]
    typed = is_strongly_typed(version, strongly_typed)
    return BuildOptions(
        strongly_typed=typed,
        strongly_typed_flag=typed and major < 11,
        tf32=precision != "fp32",  # FP32 builds keep their parity with torch (trtexec --noTF32)
        fp16=precision == "fp16" and not typed,
        int8=precision == "int8" and not typed,
        workspace_bytes=int(workspace_mb) << 20,
    )


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


def _has_qdq(network: trt.INetworkDefinition) -> bool:
    import tensorrt as trt

    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in qdq for i in range(network.num_layers))


def _cache_calibrator(calibration_cache: Path, version: str, folder: Path) -> Any:
    """Polygraphy's Calibrator replaying ``calibration_cache`` (relabelled for ``version``) with no data."""
    import tensorrt as trt
    from polygraphy.backend.trt import Calibrator

    data = calibration_cache.read_bytes()
    header, _ = parse_calibration_cache(data.decode())
    algorithm = header.rsplit("-", 1)[-1]
    if algorithm not in CALIBRATORS:
        raise ConfigError(f"calibration cache algorithm '{algorithm}' has no TensorRT calibrator",
                          f"write the cache with one of {', '.join(CALIBRATORS)}")
    base = getattr(trt, CALIBRATORS[algorithm], None)
    if base is None:
        raise ConfigError(f"TensorRT {version} has no {CALIBRATORS[algorithm]} (implicit INT8 was removed in 11)",
                          "build INT8 from the Q/DQ ONNX")
    replay = folder / "calibration.cache"
    replay.write_bytes(retarget_calibration_cache(data, version))
    return Calibrator([], cache=str(replay), BaseClass=base)


def _fresh_timing_cache_if_rejected(builder: trt.Builder, network: trt.INetworkDefinition,
                                    config: trt.IBuilderConfig) -> None:
    """A timing cache TensorRT refused (another device or release) leaves none set: start an empty one."""
    if config.get_timing_cache() is None:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


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
    installed = require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig

    version = parse_version(installed)
    v = format_version(version)
    options = build_options(version, precision, strongly_typed, workspace_mb)
    timing_path = Path(timing_cache) if timing_cache is not None else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sfedge-trt-") as tmp:
        scratch = Path(tmp)
        report(f"parsing {onnx_path.name} (TensorRT {v})", 0.0)
        with polygraphy_session(ExportError, f"TensorRT {v} cannot parse {onnx_path.name}",
                                "run lint_onnx on the file for this TensorRT release"):
            builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=options.strongly_typed_flag)()
        implicit_int8 = precision == "int8" and not _has_qdq(network)
        if implicit_int8 and (options.strongly_typed or calibration_cache is None):
            raise ConfigError(
                f"{onnx_path.name} has no Q/DQ nodes, so an int8 build needs "
                + ("a weakly typed TensorRT <= 10 build and " if options.strongly_typed else "")
                + "a calibration cache",
                "build from the Q/DQ ONNX, or pass the calibration cache written for this model",
            )
        calibrator = _cache_calibrator(Path(calibration_cache), v, scratch) if implicit_int8 and calibration_cache else None
        previous = None
        if timing_path is not None and timing_path.is_file():  # a private copy: Polygraphy locks and reads it in place
            previous = scratch / "timing.in"
            shutil.copyfile(timing_path, previous)
        config = PostprocessConfig(
            CreateConfig(tf32=options.tf32, fp16=options.fp16, int8=options.int8, calibrator=calibrator,
                         memory_pool_limits={trt.MemoryPoolType.WORKSPACE: options.workspace_bytes},
                         load_timing_cache=str(previous) if previous else None),
            _fresh_timing_cache_if_rejected,
        )
        saved = scratch / "timing.out"
        report(f"building {precision} engine (minutes on a Jetson)", 0.1)
        with polygraphy_session(ExportError, f"TensorRT {v} failed to build an engine from {onnx_path.name}",
                                "see TensorRT's log above; try a larger workspace or another precision"):
            serialized = EngineBytesFromNetwork((builder, network, parser), config=config,
                                                save_timing_cache=str(saved) if timing_path else None)()
        with atomic_path(engine_path) as out:
            out.write_bytes(memoryview(serialized))
        if timing_path is not None and saved.is_file():
            with atomic_path(timing_path) as out:
                shutil.copyfile(saved, out)
    seconds = time.perf_counter() - t0
    report(f"engine written: {engine_path.name} in {seconds:.0f} s", 1.0)
    return EngineBuild(engine_path, installed, precision, options.strongly_typed, implicit_int8, seconds,
                       engine_path.stat().st_size, timing_path)
