"""Run a TensorRT engine behind sfedge's Runner interface (on the device that built it), through Polygraphy.

Polygraphy's ``EngineFromBytes`` deserializes the engine and its ``TrtRunner``
(``polygraphy.backend.trt``, 0.53) runs it: the execution context, the CUDA
stream, device buffers and copies (``polygraphy.cuda``, a ctypes wrapper of
libcudart), the name-based I/O API and ``execute_async_v3``.  That API arrived
in TensorRT 8.5, the oldest release sfedge (and Polygraphy 0.53, which imports
``tensorrt>=8.5``) supports, so the bindings API removed in 10
(``num_bindings``, ``execute_async_v2``) is no longer called anywhere.

sfedge adds its Runner contract: the I/O as TensorSpecs (static shapes only),
outputs copied out of Polygraphy's reused host buffers, the memory figures
(:meth:`TensorRTRunner.memory_info`) and one-line errors.  tensorrt and
Polygraphy's TensorRT module are imported in :meth:`TensorRTRunner.load`,
after a subprocess has confirmed a usable GPU (creating TensorRT objects
without one crashes the process).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner
from sfedge.backends.tensorrt.gpu import GpuInfo, detect_gpu
from sfedge.backends.tensorrt.loaders import polygraphy_session, require_tensorrt
from sfedge.backends.tensorrt.version import parse_version
from sfedge.errors import BackendUnavailable

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["TensorRTRunner", "SHARED_MEMORY_NOTE", "engine_io", "activation_bytes"]

SHARED_MEMORY_NOTE = (
    "Jetson CPU and GPU share one LPDDR memory: the engine, activation and I/O figures here are carved from the "
    "same RAM as the process's host memory, so add them to host RSS for a total. Counted: the engine (about its "
    "file size: weights and kernels, resident after deserialization), TensorRT's activation/scratch memory "
    "(device_memory_size) and the I/O tensors (one device copy each). Not counted: the CUDA context and the "
    "libraries TensorRT loads (cuDNN/cuBLAS/Myelin kernels), the host copy of the plan while loading, and the Python "
    "process itself; tegrastats' RAM figure shows everything."
)


@functools.lru_cache(maxsize=1)
def _usable_gpu() -> GpuInfo | None:
    """detect_gpu once per process (loading several engines should not re-probe)."""
    return detect_gpu()


def engine_io(engine: trt.ICudaEngine) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``engine`` as TensorSpecs, by the name-based I/O API (TensorRT 8.5+).

    Refuses dynamic shapes: sfedge exports static ONNX, and the profiler and
    parity checks feed exactly these shapes.
    """
    import tensorrt as trt

    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dims = engine.get_tensor_shape(name)
        shape = [int(dims[j]) for j in range(len(dims))]
        if any(d < 0 for d in shape):
            raise BackendUnavailable(f"the engine has dynamic tensor '{name}' {shape}",
                                     "sfedge engines are static: rebuild from a static-shape ONNX")
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name  # type: ignore[no-untyped-call]  # unannotated in the stubs
        spec = TensorSpec(name, shape, dtype, "NCHW")
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return inputs, outputs


def activation_bytes(engine: trt.ICudaEngine, tensorrt_version: str) -> int:
    """TensorRT's activation/scratch memory for one execution context of ``engine``.

    ``device_memory_size_v2`` from 10.1 (it includes weight-streaming scratch);
    ``device_memory_size`` before (TensorRT 11 removed it).
    """
    if parse_version(tensorrt_version)[:2] >= (10, 1):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _layer_profiler(trt: Any) -> Any:
    """An ``IProfiler`` collecting ``report_layer_time(layer_name, ms)`` per run (TensorRT 8.5 / 10 Python API docs).

    TensorRT calls ``report_layer_time`` once per layer after each inference
    when a profiler is attached to the execution context
    (``context.profiler``; with ``execute_async_v3`` the times are emitted when
    the stream is synchronized, ``enqueue_emits_profile`` being True by
    default).  Layer names are the engine's: fused layers join their ONNX node
    names with " + ".  Written against the docs, never run here (no GPU).
    """

    class LayerProfiler(trt.IProfiler):  # type: ignore[misc]  # trt is passed in untyped
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.runs: list[dict[str, float]] = []
            self.current: dict[str, float] = {}
            self.order: list[str] = []

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            if layer_name not in self.order:
                self.order.append(layer_name)
            self.current[layer_name] = self.current.get(layer_name, 0.0) + float(ms)

        def end_run(self) -> None:
            self.runs.append(self.current)
            self.current = {}

    return LayerProfiler()


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (.engine/.plan) on this machine's GPU, with Polygraphy's TrtRunner.

    Option ``profile_layers``: attach an ``IProfiler`` to the runner's execution
    context so :meth:`layer_times` gives every layer's time in every run
    (TensorRT's own per-layer timing).
    """

    backend = "tensorrt"
    _version: str | None = None  # TensorRT's, while loaded
    _gpu: GpuInfo | None = None
    _engine: trt.ICudaEngine | None = None
    _runner: Any = None  # polygraphy.backend.trt.TrtRunner (untyped)
    _profiler: Any = None  # the IProfiler of ``profile_layers``

    def _load(self) -> None:
        gpu = _usable_gpu()
        if gpu is None or gpu.tensorrt is None or gpu.tensorrt_error:
            raise BackendUnavailable(
                f"cannot run {self.path.name}: no CUDA GPU with working TensorRT on this machine",
                "run it on the device it was built for (a TensorRT engine only runs there)",
            )
        version = require_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        with polygraphy_session(BackendUnavailable, f"TensorRT {version} cannot load {self.path.name} on {gpu.name}",
                                "an engine only loads on the TensorRT release and GPU that built it: rebuild it here"):
            engine: trt.ICudaEngine = EngineFromBytes(self.path.read_bytes())()
            runner = TrtRunner(engine, name=self.path.stem)
            runner.activate()
            if self.options.get("profile_layers"):  # TrtRunner's execution context exists once activated
                import tensorrt as trt_module

                self._profiler = _layer_profiler(trt_module)
                runner.context.profiler = self._profiler
        self._version, self._gpu, self._engine, self._runner = version, gpu, engine, runner
        try:
            self.inputs, self.outputs = engine_io(engine)
        except BackendUnavailable:
            self._close()
            raise

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {}
        for spec in self.inputs:
            arr = np.ascontiguousarray(feed[spec.name], dtype=spec.dtype)
            if list(arr.shape) != spec.shape:
                raise ValueError(f"input '{spec.name}' has shape {arr.shape}, the engine takes {tuple(spec.shape)}")
            arrays[spec.name] = arr
        with polygraphy_session(BackendUnavailable, f"TensorRT failed to run {self.path.name}",
                                "see TensorRT's log above"):
            out = self._runner.infer(arrays)  # synchronizes the stream, so the profiler has this run's layers
        if self._profiler is not None:
            self._profiler.end_run()
        # Polygraphy returns views of host buffers it reuses on the next call.
        return {spec.name: np.array(out[spec.name], copy=True) for spec in self.outputs}

    def layer_times(self) -> dict[str, Any] | None:
        """Per-layer times of every run from the attached IProfiler (None unless ``profile_layers``)."""
        prof = self._profiler
        if prof is None:
            return None
        nodes = [{"name": n, "op": "", "ms": [run.get(n, 0.0) for run in prof.runs], "inputs": [], "outputs": []}
                 for n in prof.order]
        return {"runs": [sum(run.values()) for run in prof.runs], "nodes": nodes}

    def _close(self) -> None:
        if self._runner is not None and self._runner.is_active:
            with polygraphy_session(BackendUnavailable, f"TensorRT could not release {self.path.name}",
                                    "see TensorRT's log above"):
                self._runner.deactivate()
        self._runner = self._engine = None

    def memory_info(self) -> dict[str, Any]:
        """Engine size, TensorRT's activation/scratch memory and I/O tensors, in bytes (see SHARED_MEMORY_NOTE)."""
        engine, version = self._engine, self._version
        jetson = self._gpu is not None and self._gpu.is_jetson
        info: dict[str, Any] = {
            "engine_file_bytes": self.path.stat().st_size,
            "activation_bytes": activation_bytes(engine, version) if engine is not None and version else None,
            "io_bytes": int(sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.inputs + self.outputs)),
            "shared_cpu_gpu_memory": jetson,
        }
        if jetson:
            info["note"] = SHARED_MEMORY_NOTE
        return info

    def versions(self) -> dict[str, str]:
        if self._version is None:
            return {}
        import polygraphy

        return {"tensorrt": self._version, "polygraphy": str(polygraphy.__version__)}
