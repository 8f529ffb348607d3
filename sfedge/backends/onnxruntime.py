"""ONNX Runtime (CPU execution provider): make fp32 / int8 / fp16 ONNX artifacts and run them.

* fp32: :func:`sfedge.export.export_onnx` (checked against torch at export);
* int8: export, then explicit Q/DQ (:mod:`sfedge.quantize.qdq`) with per-layer
  mixed precision until the target's int8 tolerance is met
  (:func:`sfedge.quantize.sensitivity.mixed_precision`); the same Q/DQ file is
  what TensorRT builds from;
* fp16: export, then an fp16 graph with float32 I/O (for TensorRT's
  strongly-typed mode).  ONNX Runtime 1.31's CPU EP runs it, but by inserting
  casts to float32 around the kernels it has only in float32 (all convs on
  x86): the numerics of fp16 storage at fp32 speed, so it is useful here for
  parity, not for latency.  A graph with an op the CPU EP cannot run at all
  raises :class:`BackendUnavailable` when loaded.

Every artifact's parity is measured with :class:`OnnxRuntimeRunner` on the
calibration set's held-out split against the fp32 torch outputs and checked
against ``target.tolerance(precision)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.base import Artifact, ModelSource, Runner, TensorSpec, check_parity
from sfedge.errors import BackendUnavailable, ExportError, ParityError, UnknownNameError

__all__ = ["OnnxRuntimeRunner", "RUNNER", "make", "PRECISIONS", "onnx_dtype_name"]

PRECISIONS = ("fp32", "int8", "fp16")
Progress = Callable[[str, "float | None"], None]

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
}


def onnx_dtype_name(ort_type: str) -> str:
    """ONNX Runtime's type string ('tensor(float)') -> numpy dtype name ('float32')."""
    return _ORT_TYPES.get(ort_type, ort_type)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable(
            "onnxruntime is not installed", "pip install 'sfedge[runtime]' (or onnxruntime) on this machine"
        ) from None
    return ort


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file (fp32, Q/DQ int8) on ONNX Runtime's CPU execution provider.

    ``threads`` sets the intra-op thread pool (the target's ``threads``); the
    inter-op pool is 1 and execution sequential, so two runners never fight
    over more cores than asked for.  Options: ``optimization`` ("all",
    "extended", "basic", "disable"; default "all").
    """

    backend = "onnxruntime"

    def load(self) -> None:
        ort = _import_ort()
        import psutil

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.threads or 0)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        level = self.options.get("optimization", "all")
        if level not in levels:
            raise UnknownNameError("ONNX Runtime optimization level", str(level), list(levels))
        opts.graph_optimization_level = levels[level]
        opts.log_severity_level = 3
        rss = psutil.Process().memory_info().rss
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types
            msg = str(e)
            if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
                raise BackendUnavailable(
                    f"ONNX Runtime's CPU execution provider cannot run {self.path.name}: "
                    f"{msg.splitlines()[0][-160:]}",
                    "build this artifact for the backend it was made for (e.g. tensorrt), or use an fp32 ONNX here",
                ) from None
            if not self.path.is_file():
                raise ExportError(f"ONNX file {self.path} does not exist", "check the path or build the artifact first") from None
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {msg.splitlines()[0][:200]}",
                              "rebuild it with `sfedge build` (the file is corrupt or not ONNX)") from None
        self._load_seconds = time.perf_counter() - start
        self._rss_load = psutil.Process().memory_info().rss - rss
        self.inputs = [self._spec(a) for a in self.session.get_inputs()]
        self.outputs = [self._spec(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]  # symbolic dims: batch 1
        return TensorSpec(arg.name, shape, onnx_dtype_name(arg.type), "NCHW")

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, outs, strict=True))

    def close(self) -> None:
        self.session = None

    def memory_info(self) -> dict[str, Any]:
        """What can be seen of ONNX Runtime's memory: the file, its weights, the RSS growth while loading.

        ONNX Runtime's Python API exposes no arena statistics, so the load
        figure is process-level (psutil), measured around session creation.
        Weight bytes need the ``onnx`` package (absent on runtime-only devices).
        """
        info: dict[str, Any] = {"file_bytes": os.path.getsize(self.path)}
        try:
            import onnx
        except ImportError:
            onnx = None
        if onnx is not None:
            model = onnx.load(str(self.path), load_external_data=False)
            info["weights_bytes"] = sum(
                int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                for t in model.graph.initializer
            )
        if getattr(self, "session", None) is not None:
            info["rss_load_bytes"] = int(self._rss_load)
            info["load_seconds"] = round(self._load_seconds, 4)
        return info

    def versions(self) -> dict[str, str]:
        ort = _import_ort()
        return {"onnxruntime": ort.__version__, "execution_provider": "CPUExecutionProvider"}


RUNNER = OnnxRuntimeRunner


def make(
    source: ModelSource,
    target: Any,
    precision: str,
    calibration: Any,
    workdir: str | Path,
    *,
    progress: Progress | None = None,
    method: str = "entropy",
) -> Artifact:
    """Build the ONNX Runtime artifact for ``precision`` in ``workdir``, parity-checked on the held-out split.

    ``method`` is the int8 calibration method (entropy, percentile, minmax).
    Raises ParityError when the artifact misses ``target.tolerance(precision)``.
    The int8 artifact's ``float_layers`` are the layers mixed precision kept
    in float; its ``meta`` holds the calibration method, the ranges file name
    and the sensitivity table.
    """
    from sfedge.export import export_onnx

    if precision not in PRECISIONS:
        raise UnknownNameError("precision for onnxruntime", precision, list(PRECISIONS))
    workdir = Path(workdir)
    stem = f"{source.name}-{source.weights_sha256[:8]}"
    holdout = calibration.holdout
    reference = source.reference(holdout)
    fp32 = export_onnx(source, workdir / f"{stem}.onnx", tolerance=target.tolerance("fp32"), check_inputs=holdout,
                       progress=progress)
    if precision == "fp32":
        _check(fp32, holdout, reference, target, precision)
        return fp32
    if precision == "fp16":
        from sfedge.quantize.qdq import to_fp16

        artifact = to_fp16(fp32, workdir / f"{stem}-fp16.onnx")
        artifact.notes.append("ONNX Runtime's CPU EP runs fp16 by casting to float32 around its kernels: "
                              "fp16 numerics, fp32 speed")
        _check(artifact, holdout, reference, target, precision)
        return artifact
    from sfedge.quantize.sensitivity import mixed_precision

    artifact, report = mixed_precision(
        fp32, calibration, workdir / f"{stem}-int8.onnx", reference, target.tolerance(precision),
        method=method, threads=target.threads, progress=progress,
    )
    artifact.meta["sensitivity"] = [s.as_dict() for s in report.sensitivity]
    artifact.meta["mixed_precision"] = {k: v for k, v in report.as_dict().items() if k != "sensitivity"}
    if artifact.float_layers:
        artifact.notes.append(f"{len(artifact.float_layers)} of {report.layers} layers kept in float to meet the "
                              f"int8 tolerance: {', '.join(artifact.float_layers)}")
    _check(artifact, holdout, reference, target, precision)
    return artifact


def _check(artifact: Artifact, holdout: np.ndarray, reference: np.ndarray, target: Any, precision: str) -> None:
    """Parity of ``artifact`` with the RUNNER at the target's threads, checked against the target's tolerance.

    An artifact that misses it is deleted (with its companion files): nothing
    that looks whole is left behind.
    """
    from sfedge.quantize.qdq import measure_onnx_parity

    parity = measure_onnx_parity(artifact.path, holdout, reference, target.threads)
    artifact.parity = parity.as_dict()
    try:
        check_parity(parity, target.tolerance(precision), f"the {precision} ONNX Runtime artifact {artifact.path.name}")
    except ParityError:
        for f in [artifact.path, *artifact.files]:
            Path(f).unlink(missing_ok=True)
        raise
