"""Run a TensorRT engine behind sfedge's Runner interface (on the device that built it).

Name-based I/O API where it exists (TensorRT 8.5 added it; 10 and 11 only
have it): ``engine.num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode``,
``context.set_tensor_address`` and ``execute_async_v3(stream)``.  Older
engines fall back to the bindings API (``num_bindings``,
``execute_async_v2(bindings, stream)``), removed in 10.  Polygraphy's TrtRunner
(backend/trt/runner.py, 0.53) is the model for the named path.

Device memory comes from Polygraphy's ctypes wrapper of libcudart
(``polygraphy.cuda``, pure Python, pip-installable on a Jetson) or, failing
that, NVIDIA's cuda-python (``cuda.bindings.runtime`` / ``cuda.cudart``), as
TensorRT's own Python samples use.  tensorrt and both CUDA modules are
imported in :meth:`TensorRTRunner.load`, after a subprocess has confirmed a
usable GPU (creating TensorRT objects without one crashes the process).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner
from sfedge.backends.tensorrt.gpu import GpuInfo, detect_gpu
from sfedge.errors import BackendUnavailable

__all__ = ["TensorRTRunner", "SHARED_MEMORY_NOTE"]

SHARED_MEMORY_NOTE = (
    "Jetson CPU and GPU share one LPDDR memory: the engine, activation and I/O figures here are carved from the "
    "same RAM as the process's host memory, so add them to host RSS for a total. Counted: the engine (about its "
    "file size: weights and kernels, resident after deserialization), TensorRT's activation/scratch memory "
    "(device_memory_size) and sfedge's I/O buffers. Not counted: the CUDA context and the libraries TensorRT "
    "loads (cuDNN/cuBLAS/Myelin kernels), the host copy of the plan while loading, and the Python process "
    "itself; tegrastats' RAM figure shows everything."
)


@functools.lru_cache(maxsize=1)
def _usable_gpu() -> GpuInfo | None:
    """detect_gpu once per process (loading several engines should not re-probe)."""
    return detect_gpu()


class _CudaRuntime:
    """cudaMalloc / cudaMemcpyAsync / streams through polygraphy.cuda or cuda-python, whichever is installed."""

    def __init__(self) -> None:
        try:
            from polygraphy import cuda as pcuda

            self._p = pcuda
            self._w = pcuda.wrapper()
            self.kind = "polygraphy.cuda"
            return
        except ImportError:
            self._p = None
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError as e:
                raise BackendUnavailable(
                    "no CUDA runtime bindings to allocate GPU memory",
                    "pip install 'sfedge[runtime]' (polygraphy's CUDA wrapper) or cuda-python on the device",
                ) from e
        self._rt = cudart
        self.kind = "cuda-python"

    def _check(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendUnavailable(f"CUDA call failed: {err}", "check the GPU with tegrastats / nvidia-smi")
        return rest[0] if rest else None

    def malloc(self, nbytes: int) -> int:
        if self._p is not None:
            return int(self._w.malloc(nbytes))
        return int(self._check(self._rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        if self._p is not None:
            self._w.free(ptr)
        else:
            self._check(self._rt.cudaFree(ptr))

    def create_stream(self) -> int:
        if self._p is not None:
            return int(self._w.create_stream())
        return int(self._check(self._rt.cudaStreamCreate()))

    def destroy_stream(self, stream: int) -> None:
        if self._p is not None:
            self._w.destroy_stream(stream)
        else:
            self._check(self._rt.cudaStreamDestroy(stream))

    def synchronize(self, stream: int) -> None:
        if self._p is not None:
            self._w.stream_synchronize(stream)
        else:
            self._check(self._rt.cudaStreamSynchronize(stream))

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        if self._p is not None:
            self._w.memcpy(ptr, host.ctypes.data, host.nbytes, self._p.MemcpyKind.HostToDevice, stream)
        else:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self._rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        if self._p is not None:
            self._w.memcpy(host.ctypes.data, ptr, host.nbytes, self._p.MemcpyKind.DeviceToHost, stream)
        else:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(self._rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))


def _layer_profiler(trt: Any) -> Any:
    """An ``IProfiler`` collecting ``report_layer_time(layer_name, ms)`` per run (TensorRT 8.5 / 10 Python API docs).

    TensorRT calls ``report_layer_time`` once per layer after each inference
    when a profiler is attached to the execution context
    (``context.profiler``; with ``execute_async_v3`` the times are emitted when
    the stream is synchronized, ``enqueue_emits_profile`` being True by
    default).  Layer names are the engine's: fused layers join their ONNX node
    names with " + ".  Written against the docs, never run here (no GPU).
    """

    class LayerProfiler(trt.IProfiler):
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
    """Runs a serialized TensorRT engine (.engine/.plan) on this machine's GPU.

    Option ``profile_layers``: attach an ``IProfiler`` so :meth:`layer_times`
    gives every layer's time in every run (TensorRT's own per-layer timing).
    """

    backend = "tensorrt"

    def _load(self) -> None:
        gpu = _usable_gpu()
        if gpu is None or gpu.tensorrt is None or gpu.tensorrt_error:
            raise BackendUnavailable(
                f"cannot run {self.path.name}: no CUDA GPU with working TensorRT on this machine",
                "run it on the device it was built for (a TensorRT engine only runs there)",
            )
        import tensorrt as trt

        self._trt, self._gpu = trt, gpu
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} cannot load {self.path.name} on {gpu.name}",
                "an engine only loads on the TensorRT release and GPU that built it: rebuild it here",
            )
        self.context = self.engine.create_execution_context()
        self._profiler = None
        if self.options.get("profile_layers"):
            self._profiler = _layer_profiler(trt)
            self.context.profiler = self._profiler
        self._cuda = _CudaRuntime()
        self._stream = self._cuda.create_stream()
        self._named = hasattr(self.context, "execute_async_v3") and hasattr(self.engine, "num_io_tensors")
        self._buffers: dict[str, tuple[int, np.ndarray]] = {}  # name -> (device pointer, host array)
        self._bindings: list[int] = []
        self.inputs, self.outputs = [], []
        for name, is_input, shape, dtype in self._io():
            if any(d < 0 for d in shape):
                raise BackendUnavailable(f"{self.path.name} has dynamic input '{name}' {shape}",
                                         "sfedge engines are static: rebuild from a static-shape ONNX")
            host = np.empty(shape, dtype)
            ptr = self._cuda.malloc(max(host.nbytes, 1))
            self._buffers[name] = (ptr, host)
            self._bindings.append(ptr)
            if self._named:
                self.context.set_tensor_address(name, ptr)
            spec = TensorSpec(name, list(shape), np.dtype(dtype).name, "NCHW")
            (self.inputs if is_input else self.outputs).append(spec)

    def _io(self) -> list[tuple[str, bool, tuple[int, ...], Any]]:
        trt, engine = self._trt, self.engine
        out = []
        if self._named:
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                out.append((name, is_input, tuple(self.context.get_tensor_shape(name)),
                            trt.nptype(engine.get_tensor_dtype(name))))
        else:  # bindings API (TensorRT < 8.5, removed in 10)
            for i in range(engine.num_bindings):
                out.append((engine.get_binding_name(i), engine.binding_is_input(i),
                            tuple(engine.get_binding_shape(i)), trt.nptype(engine.get_binding_dtype(i))))
        return out

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for spec in self.inputs:
            ptr, host = self._buffers[spec.name]
            arr = np.ascontiguousarray(feed[spec.name], dtype=host.dtype)
            if arr.shape != host.shape:
                raise ValueError(f"input '{spec.name}' has shape {arr.shape}, the engine takes {host.shape}")
            self._cuda.to_device(ptr, arr, self._stream)
        ok = (self.context.execute_async_v3(self._stream) if self._named
              else self.context.execute_async_v2(self._bindings, self._stream))
        if not ok:
            raise BackendUnavailable(f"TensorRT failed to run {self.path.name}", "see TensorRT's log above")
        for spec in self.outputs:
            ptr, host = self._buffers[spec.name]
            self._cuda.to_host(host, ptr, self._stream)
        self._cuda.synchronize(self._stream)
        if getattr(self, "_profiler", None) is not None:
            self._profiler.end_run()
        return {spec.name: self._buffers[spec.name][1].copy() for spec in self.outputs}

    def layer_times(self) -> dict[str, Any] | None:
        """Per-layer times of every run from the attached IProfiler (None unless ``profile_layers``)."""
        prof = getattr(self, "_profiler", None)
        if prof is None:
            return None
        nodes = [{"name": n, "op": "", "ms": [run.get(n, 0.0) for run in prof.runs], "inputs": [], "outputs": []}
                 for n in prof.order]
        return {"runs": [sum(run.values()) for run in prof.runs], "nodes": nodes}

    def _close(self) -> None:
        for ptr, _ in getattr(self, "_buffers", {}).values():
            self._cuda.free(ptr)
        if getattr(self, "_stream", None) is not None:
            self._cuda.destroy_stream(self._stream)
        self._buffers, self._stream = {}, None
        self.context = self.engine = self._runtime = None

    def memory_info(self) -> dict[str, Any]:
        """Engine size, TensorRT's activation/scratch memory and I/O buffers, in bytes (see SHARED_MEMORY_NOTE)."""
        engine = self.engine
        # device_memory_size_v2 (10.1+) replaces device_memory_size, which TensorRT 11 removed.
        activation = getattr(engine, "device_memory_size_v2", None)
        if activation is None:
            activation = getattr(engine, "device_memory_size", None)
        info: dict[str, Any] = {
            "engine_file_bytes": self.path.stat().st_size,
            "activation_bytes": int(activation) if activation is not None else None,
            "io_bytes": int(sum(host.nbytes for _, host in self._buffers.values())),
            "shared_cpu_gpu_memory": bool(self._gpu.is_jetson),
        }
        if self._gpu.is_jetson:
            info["note"] = SHARED_MEMORY_NOTE
        return info

    def versions(self) -> dict[str, str]:
        trt = getattr(self, "_trt", None)
        out = {"tensorrt": trt.__version__} if trt is not None else {}
        if getattr(self, "_cuda", None) is not None:
            out["cuda_memory"] = self._cuda.kind
        return out

