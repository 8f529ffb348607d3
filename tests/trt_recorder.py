"""A recording stand-in for TensorRT's Python module, to drive Polygraphy's real TensorRT loaders without a GPU.

TensorRT cannot be installed on these machines.  This module builds a ``tensorrt`` look-alike for one release
(8.5, 10.x, 11.x: the enums hold what that release has, so Polygraphy fails exactly where the real one would) that
records what it is asked: network creation flags, builder flags, memory pools, timing cache, calibrator.  Its
ONNX parser reads the real ONNX file (inputs and one layer per node, Q/DQ nodes as QUANTIZE/DEQUANTIZE layers),
and its ``build_serialized_network`` behaves like TensorRT where sfedge relies on it: implicit INT8 reads the
calibrator's cache, and asks for a batch (getting none: build fails) when there is no cache.  The "engine" bytes
are a JSON record of the configuration at build time.

What this can show: which options sfedge asks Polygraphy for per release and precision, that Polygraphy's real
code turns them into the expected TensorRT calls, and that sfedge's handling around it (errors, atomic writes,
timing cache, calibration cache relabelling) works.  What it cannot show: that TensorRT accepts the network or
builds a correct engine -- only a GPU can.

Also here: the stand-ins tests put in place of the GPU probe, ``build_engine`` and ``TensorRTRunner`` when they
drive everything else for real (``ORIN``, ``fake_build_engine``, ``EngineAsOnnx``, ``DriftingEngine``).
"""

from __future__ import annotations

import enum
import json
import shutil
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.onnxruntime.runner import OnnxRuntimeRunner
from sfedge.backends.tensorrt.builder import EngineBuild
from sfedge.backends.tensorrt.gpu import GpuInfo
from sfedge.fileio import atomic_path

__all__ = ["make_fake_tensorrt", "installed_fake_tensorrt", "engine_record", "ORIN", "fake_build_engine",
           "EngineAsOnnx", "DriftingEngine"]


def _enum(name: str, members: list[str]) -> type[enum.IntEnum]:
    return enum.IntEnum(name, [(m, i) for i, m in enumerate(members)])  # type: ignore[return-value]


class _HostMemory(bytes):
    """TensorRT's IHostMemory: a buffer that is also a context manager."""

    def __enter__(self) -> _HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def make_fake_tensorrt(version: str, calls: list[tuple[Any, ...]]) -> types.ModuleType:
    """A ``tensorrt`` module for release ``version`` whose objects append what they are asked to ``calls``."""
    major, minor, patch = (int(p) for p in (version.split(".") + ["0", "0"])[:3])
    code = major * (10000 if major >= 10 else 1000) + minor * 100 + patch  # NV_TENSORRT_VERSION
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]

    flags = ["TF32", "DEBUG", "GPU_FALLBACK", "REFIT", "SPARSE_WEIGHTS", "DISABLE_TIMING_CACHE"]
    if major < 11:  # removed in 11 ("Removed Python APIs and Replacements", TensorRT 10.x -> 11.x migration guide)
        flags = ["FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                 "DIRECT_IO"] + flags
    trt.BuilderFlag = _enum("BuilderFlag", flags)  # type: ignore[attr-defined]
    creation = ["EXPLICIT_BATCH"] if major < 11 else []
    if major >= 10:
        creation.append("STRONGLY_TYPED")
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", creation)  # type: ignore[attr-defined]
    trt.MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",  # type: ignore[attr-defined]
                                                  "DLA_GLOBAL_DRAM", "TACTIC_SHARED_MEMORY"])
    trt.LayerType = _enum("LayerType", ["CONVOLUTION", "ACTIVATION", "QUANTIZE", "DEQUANTIZE", "SHAPE", "OTHER"])  # type: ignore[attr-defined]
    trt.ProfilingVerbosity = _enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"])  # type: ignore[attr-defined]
    trt.DeviceType = _enum("DeviceType", ["GPU", "DLA"])  # type: ignore[attr-defined]
    trt.OnnxParserFlag = _enum("OnnxParserFlag", ["NATIVE_INSTANCENORM"])  # type: ignore[attr-defined]
    trt.TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])  # type: ignore[attr-defined]
    trt.DataType = _enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "INT64"])  # type: ignore[attr-defined]
    trt.float32, trt.float16, trt.int8, trt.int32 = (trt.DataType.FLOAT, trt.DataType.HALF,  # type: ignore[attr-defined]
                                                     trt.DataType.INT8, trt.DataType.INT32)
    trt.bool, trt.uint8, trt.int64 = trt.DataType.BOOL, trt.DataType.UINT8, trt.DataType.INT64  # type: ignore[attr-defined]

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class ILogger:
        def __init__(self) -> None:
            pass

    trt.Logger, trt.ILogger = Logger, ILogger  # type: ignore[attr-defined]
    trt.init_libnvinfer_plugins = lambda logger, namespace: True  # type: ignore[attr-defined]

    if major < 11:  # calibrators: deprecated in 10.1, removed in 11
        for name in ("IInt8EntropyCalibrator2", "IInt8EntropyCalibrator", "IInt8MinMaxCalibrator",
                     "IInt8LegacyCalibrator", "IInt8Calibrator"):
            setattr(trt, name, type(name, (), {"__init__": lambda self: None}))

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name, self.shape, self.dtype, self.is_shape_tensor = name, shape, trt.DataType.FLOAT, False

    class Layer:
        def __init__(self, name: str, type_: Any) -> None:
            self.name, self.type, self.precision_is_set = name, type_, False

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.layers = flags, [], []

        def get_flag(self, flag: Any) -> bool:
            return bool(self.flags & (1 << int(flag)))

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

        def __len__(self) -> int:
            return len(self.layers)

        def __getitem__(self, i: int) -> Layer:
            return self.layers[i]

    class Parser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.num_errors, self.flags, self.errors = network, 0, 0, []

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def clear_flag(self, flag: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            import onnx

            calls.append(("parse_from_file", Path(path).name))
            try:
                graph = onnx.load(path, load_external_data=False).graph
            except Exception as e:  # TensorRT's parser reports the failure through num_errors / get_error
                self.errors.append(f"ModelImporter: failed to parse the ONNX model: {type(e).__name__}")
                self.num_errors = len(self.errors)
                return False
            inits = {t.name for t in graph.initializer}
            for inp in graph.input:
                if inp.name not in inits:
                    dims = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
                    self.network.inputs.append(Tensor(inp.name, dims))
            kinds = {"QuantizeLinear": trt.LayerType.QUANTIZE, "DequantizeLinear": trt.LayerType.DEQUANTIZE,
                     "Conv": trt.LayerType.CONVOLUTION, "Relu": trt.LayerType.ACTIVATION}
            for node in graph.node:
                self.network.layers.append(Layer(node.name, kinds.get(node.op_type, trt.LayerType.OTHER)))
            return True

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> _HostMemory:
            return _HostMemory(self.data or b"fresh timing cache")

        def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
            return True

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, Any] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (lo, opt, hi)

        def get_shape(self, name: str) -> Any:
            return self.shapes[name]

        def __bool__(self) -> bool:
            return True

    class Config:
        def __init__(self) -> None:
            self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default: TF32 on
            self.pools: dict[Any, int] = {}
            self.timing_cache: TimingCache | None = None
            if major < 11:  # IBuilderConfig.int8_calibrator: removed in 11
                self.int8_calibrator: Any = None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            self.DLA_core, self.default_device_type, self.num_optimization_profiles = -1, trt.DeviceType.GPU, 0

        def set_flag(self, flag: Any) -> None:
            calls.append(("set_flag", flag.name))
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            calls.append(("clear_flag", flag.name))
            self.flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self.flags

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            calls.append(("set_memory_pool_limit", pool.name, size))
            self.pools[pool] = size

        def get_memory_pool_limit(self, pool: Any) -> int:
            return self.pools.get(pool, 0)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.data.startswith(b"OTHER-DEVICE"):  # TensorRT refuses a cache from another device or release
                calls.append(("set_timing_cache", "rejected"))
                return False
            calls.append(("set_timing_cache", cache.data.decode() or "empty"))
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.timing_cache

        def add_optimization_profile(self, profile: Profile) -> int:
            self.num_optimization_profiles += 1
            return 0

        def set_calibration_profile(self, profile: Profile) -> bool:
            return True

    class Builder:
        def __init__(self, logger: Any) -> None:
            calls.append(("Builder",))

        def create_network(self, flags: int = 0) -> Network:
            names = [f.name for f in trt.NetworkDefinitionCreationFlag if flags & (1 << int(f))]
            calls.append(("create_network", sorted(names)))
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> _HostMemory | None:
            record: dict[str, Any] = {
                "tensorrt": version,
                "network_flags": sorted(f.name for f in trt.NetworkDefinitionCreationFlag if network.get_flag(f)),
                "builder_flags": sorted(f.name for f in config.flags),
                "workspace": config.pools.get(trt.MemoryPoolType.WORKSPACE),
                "timing_cache": config.timing_cache.data.decode() if config.timing_cache else None,
                "calibration_cache_header": None,
            }
            int8 = hasattr(trt.BuilderFlag, "INT8") and trt.BuilderFlag.INT8 in config.flags
            qdq = any(layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE) for layer in network.layers)
            if int8 and not qdq:
                calibrator = getattr(config, "int8_calibrator", None)
                cache = calibrator.read_calibration_cache() if calibrator is not None else None
                if cache and not bytes(cache).startswith(f"TRT-{code}-".encode()):
                    calls.append(("calibration cache ignored", bytes(cache).decode().splitlines()[0]))
                    cache = None  # TensorRT ignores a cache from another release, then calibrates
                if cache:
                    record["calibration_cache_header"] = bytes(cache).decode().splitlines()[0]
                    record["calibrator_base"] = [b.__name__ for b in type(calibrator).__mro__][1]
                elif calibrator is None or calibrator.get_batch([t.name for t in network.inputs]) is None:
                    calls.append(("build_serialized_network", "calibration failed"))
                    return None  # TensorRT: "Calibration failure occurred with no scaling factors detected"
            calls.append(("build_serialized_network", record))
            return _HostMemory(b"FAKE-ENGINE " + json.dumps(record).encode())

    trt.Builder, trt.OnnxParser = Builder, Parser  # type: ignore[attr-defined]
    return trt


def engine_record(engine: Path) -> dict[str, Any]:
    """The configuration a fake engine was built with."""
    data = engine.read_bytes()
    assert data.startswith(b"FAKE-ENGINE "), data[:40]
    return json.loads(data[len(b"FAKE-ENGINE "):])


def _reset_polygraphy(fake: types.ModuleType) -> None:
    """Drop every reference Polygraphy cached to ``fake`` (its lazy modules import once, its TRT logger is global)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy"):
            continue
        for value in list(vars(module).values()):
            if type(value).__name__ == "LazyModule" and vars(value).get("module") is fake:
                object.__setattr__(value, "module", None)
        if hasattr(module, "TRT_LOGGER"):
            module.TRT_LOGGER = None


@contextmanager
def installed_fake_tensorrt(version: str):  # type: ignore[no-untyped-def]
    """``import tensorrt`` gives the fake for ``version`` inside the block; yields the list of recorded calls."""
    calls: list[tuple[Any, ...]] = []
    fake = make_fake_tensorrt(version, calls)
    saved = sys.modules.get("tensorrt")
    sys.modules["tensorrt"] = fake
    try:
        yield calls
    finally:
        if saved is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = saved
        _reset_polygraphy(fake)


# -- stand-ins for the GPU probe, the engine builder and the runner (a Jetson Orin Nano with TensorRT 10.3) --------
ORIN = GpuInfo(name="Orin", sm=87, memory_bytes=7 << 30, cuda_driver=12060, tensorrt="10.3.0.30",
               jetson_model="NVIDIA Jetson Orin Nano Developer Kit", l4t="# R36 (release), REVISION: 4.0",
               dla_cores=0, free_memory_bytes=5 << 30)


def fake_build_engine(onnx_path, engine_path, *, precision, timing_cache=None, workspace_mb=1024, **_):
    """build_engine's stand-in: the "engine" is the ONNX it was built from (EngineAsOnnx runs it)."""
    t0 = time.perf_counter()
    with atomic_path(engine_path) as tmp:
        shutil.copyfile(onnx_path, tmp)
    return EngineBuild(Path(engine_path), ORIN.tensorrt, precision, False, False, time.perf_counter() - t0,
                       Path(engine_path).stat().st_size, None)


class EngineAsOnnx(OnnxRuntimeRunner):
    """TensorRTRunner's stand-in: runs that "engine" with ONNX Runtime."""

    backend = "tensorrt"


class DriftingEngine(EngineAsOnnx):
    """An engine whose outputs are 0.01 off: what a wrong kernel or precision would look like."""

    def _infer(self, feed):
        return {k: v + np.float32(0.01) for k, v in super()._infer(feed).items()}
