"""Run ONNX files (fp32, fp16, explicit Q/DQ int8) on ONNX Runtime's CPU execution provider (device side).

ONNX Runtime is imported when a runner loads, so importing this module costs
nothing on a device without it.  The build side is :mod:`.make`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import psutil

from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner
from sfedge.backends.onnxruntime.graph import read_graph
from sfedge.backends.registry import missing_runtime
from sfedge.errors import BackendUnavailable, ExportError, UnknownNameError

__all__ = ["OnnxRuntimeRunner", "onnx_dtype_name"]

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
    except ImportError as e:
        raise missing_runtime("onnxruntime", "onnxruntime is not installed") from e
    return ort


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file (fp32, Q/DQ int8) on ONNX Runtime's CPU execution provider.

    ``threads`` sets the intra-op thread pool (the target's ``threads``); the
    inter-op pool is 1 and execution sequential, so two runners never fight
    over more cores than asked for.  Options: ``optimization`` ("all",
    "extended", "basic", "disable"; default "all"); ``profile_layers`` (True:
    ONNX Runtime's own profiler records every node of every run, read with
    :meth:`layer_times`; it costs a little per node, so latency runs leave it off);
    ``spinning`` (False: the intra-op pool sleeps between runs instead of
    spinning, which several sessions sharing one process need).
    """

    backend = "onnxruntime"

    def _load(self) -> None:
        ort = _import_ort()
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
        if not self.options.get("spinning", True):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._profile_dir = None
        if self.options.get("profile_layers"):
            self._profile_dir = tempfile.mkdtemp(prefix="sfedge-ort-profile-")
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(self._profile_dir, "ort")
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
                ) from e
            if not self.path.is_file():
                raise ExportError(f"ONNX file {self.path} does not exist", "check the path or build the artifact first") from e
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {msg.splitlines()[0][:200]}",
                              "rebuild it with `sfedge build` (the file is corrupt or not ONNX)") from e
        self._load_seconds = time.perf_counter() - start
        self._rss_load = psutil.Process().memory_info().rss - rss
        self.inputs = [self._spec(a) for a in self.session.get_inputs()]
        self.outputs = [self._spec(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]  # symbolic dims: batch 1
        return TensorSpec(arg.name, shape, onnx_dtype_name(arg.type), "NCHW")

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, outs, strict=True))

    def _close(self) -> None:
        self.session = None
        if getattr(self, "_profile_dir", None):
            import shutil

            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None

    def layer_times(self) -> dict[str, Any] | None:
        """Every node's time in every run so far, from ONNX Runtime's profiler (None unless ``profile_layers``).

        Ends the profiling session (ONNX Runtime writes its JSON trace then), so
        call it once, after the runs to report.  Returns ``{"runs": [run ms],
        "nodes": [{"name", "op", "ms": [one per run], "inputs", "outputs"}]}``
        with nodes in execution order; a node's name is the *optimized* graph's
        (fused and re-laid-out nodes are renamed), see
        :func:`sfedge.profile.layers.node_layers`.
        """
        if not getattr(self, "_profile_dir", None) or getattr(self, "session", None) is None:
            return None
        with open(self.session.end_profiling()) as f:
            events = json.load(f)
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                      if e.get("cat") == "Session" and e.get("name") == "SequentialExecutor::Execute")
        starts = [r[0] for r in runs]
        nodes: dict[str, dict[str, Any]] = {}
        import bisect

        for e in events:
            if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
                continue
            run = bisect.bisect_right(starts, e["ts"]) - 1
            if run < 0:
                continue
            name = e["name"][: -len("_kernel_time")]
            args = e.get("args", {})
            node = nodes.setdefault(name, {"name": name, "op": args.get("op_name", ""), "ms": [0.0] * len(runs),
                                           "inputs": _shapes(args.get("input_type_shape")),
                                           "outputs": _shapes(args.get("output_type_shape"))})
            node["ms"][run] += e["dur"] / 1e3
        return {"runs": [(b - a) / 1e3 for a, b in runs], "nodes": list(nodes.values())}

    def memory_info(self) -> dict[str, Any]:
        """What can be seen of ONNX Runtime's memory: the file, its weights, the RSS growth while loading.

        ONNX Runtime's Python API exposes no arena statistics, so the load
        figure is process-level (psutil), measured around session creation.
        Weight bytes are read from the file itself (:mod:`.graph`: no ``onnx``
        package needed, and no seconds spent importing it in every worker).
        """
        info: dict[str, Any] = {"file_bytes": os.path.getsize(self.path)}
        try:
            info["weights_bytes"] = read_graph(self.path).weights_bytes
        except (OSError, ValueError, IndexError):  # not readable as ONNX: the figure is optional
            pass
        if getattr(self, "session", None) is not None:
            info["rss_load_bytes"] = int(self._rss_load)
            info["load_seconds"] = round(self._load_seconds, 4)
        return info

    def versions(self) -> dict[str, str]:
        ort = _import_ort()
        return {"onnxruntime": ort.__version__, "execution_provider": "CPUExecutionProvider"}


def _shapes(entries: Any) -> list[list[int]]:
    """[{'float': [1, 16, 64, 64]}, ...] (the profiler's type-and-shape list) -> [[1, 16, 64, 64], ...]."""
    out = []
    for e in entries or []:
        if isinstance(e, dict) and e:
            out.append([int(v) for v in next(iter(e.values()))])
    return out
