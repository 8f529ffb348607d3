"""Per-layer time: where an inference's milliseconds go, per layer, SFConv aligned with its vanilla pair.

Device side (numpy and the runtime).  Two sources, one shape of result
(:class:`LayerProfile`: one row per layer, its median time over the runs, its
MACs and achieved GMAC/s):

* **the runtime's own profiler** where it has one sfedge can read: ONNX
  Runtime's (``SessionOptions.enable_profiling``: every node of every run)
  and TensorRT's ``IProfiler``.  A worker process loads the artifact with
  ``profile_layers``, warms up, runs, and returns the per-node times of those
  runs (:func:`measure_layers`);
* **per-layer models** for TFLite, whose Python interpreter has no profiler:
  each layer alone at its real input shape and configuration, measured like a
  latency table (:mod:`sfedge.profile.latency_table`), see
  :func:`profile_from_table`.

Naming: ONNX Runtime renames what it fuses (a conv with its BatchNorm and
ReLU runs as one node named after the ReLU's output, ``/inc/inc.2/Relu_output_0_nchwc``)
and inserts layout nodes (``ReorderInput``, ``ReorderOutput``).  Each profiled
node is traced back through the *original* ONNX graph (read without the
``onnx`` package, :mod:`sfedge.backends.onnxruntime.graph`) to the conv it
computes, and named by that conv's torch module path (``inc.0``); an SFConv
pair's ``inc.0.conv_a`` and ``inc.0.conv_b`` both belong to layer ``inc.0``,
which is how an SFConv model lines up with its dense twin.  Layout nodes the
runtime inserted are charged to the layer they serve: a ``ReorderOutput`` to
the layer before it, a ``ReorderInput`` to the layer after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sfedge.backends.onnxruntime.graph import OnnxGraph, read_graph
from sfedge.errors import SfedgeError
from sfedge.profile.client import WorkerProcess
from sfedge.profile.types import MeasureConfig, Subject
from sfedge.progress import Progress

__all__ = [
    "LayerRow", "LayerProfile", "module_path", "node_layers", "layer_profile", "measure_layers", "compare_layers",
    "comparison_markdown", "profile_from_table", "PROFILED_BACKENDS",
]

# Backends whose runtime profiler sfedge reads (the others get per-layer models).
PROFILED_BACKENDS = ("onnxruntime", "tensorrt")
CONV_OPS = ("Conv", "FusedConv", "ConvTranspose", "QLinearConv", "ConvInteger", "NhwcConv", "NchwcConv")
# Ops a runtime fuses into the conv before them (walked back through to find that conv).
FUSED_INTO_CONV = ("Relu", "BatchNormalization", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                   "Add", "Mul", "Sum", "DequantizeLinear", "QuantizeLinear")
SFCONV_PARTS = ("conv_a", "conv_b")


@dataclass
class LayerRow:
    """One layer: the profiled nodes charged to it, its median time per inference and its MACs."""

    layer: str
    kind: str  # "conv", "sfconv", "other" or "runtime"
    ms: float
    macs: int | None = None
    nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)

    @property
    def gmacs(self) -> float | None:
        """Achieved GMAC/s (None without MACs or time)."""
        return self.macs / self.ms / 1e6 if self.macs and self.ms > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gmacs": self.gmacs}


@dataclass
class LayerProfile:
    """Per-layer times of one configuration, and how they add up against the profiled runs."""

    label: str
    backend: str
    precision: str
    source: str  # "onnxruntime profiler", "tensorrt profiler", "per-layer models"
    rows: list[LayerRow]
    runs: int
    run_ms: float  # median of the profiled runs' total time (the runtime's own clock)
    notes: list[str] = field(default_factory=list)

    @property
    def layer_sum_ms(self) -> float:
        return float(sum(r.ms for r in self.rows))

    def row(self, layer: str) -> LayerRow | None:
        return next((r for r in self.rows if r.layer == layer), None)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "backend": self.backend, "precision": self.precision, "source": self.source,
                "runs": self.runs, "run_ms": self.run_ms, "layer_sum_ms": self.layer_sum_ms, "notes": self.notes,
                "rows": [r.as_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerProfile:
        names = LayerRow.__dataclass_fields__
        return cls(d["label"], d["backend"], d["precision"], d["source"],
                   [LayerRow(**{k: v for k, v in r.items() if k in names}) for r in d["rows"]], int(d["runs"]),
                   float(d["run_ms"]), list(d.get("notes") or []))


def module_path(node_name: str) -> str:
    """The torch module path in a TorchScript-exported node name: ``/ups.0/conv/conv.0/conv_a/Conv`` -> ``ups.0.conv.0.conv_a``.

    The exporter names each scope relative to the last module it was reached
    through by attribute (``conv``), joined to the container index
    (``conv.0``); a component that extends the previous one is its child, any
    other one is an attribute of it.  Names without scopes are returned as
    they are.
    """
    comps = [c for c in node_name.strip("/").split("/") if c]
    if len(comps) < 2:
        return node_name
    full, prev = "", ""
    for c in comps[:-1]:  # the last component is the op (Conv, Relu, Concat_1)
        if prev and c.startswith(prev + "."):
            full += c[len(prev):]
        else:
            full = f"{full}.{c}" if full else c
        prev = c
    return full


def _original(name: str, graph: OnnxGraph | None) -> Any:
    """The original ONNX node a profiled node stands for (fused nodes carry their last output's name)."""
    if graph is None:
        return None
    for candidate in (name, name.removesuffix("_nchwc")):
        if candidate in graph.by_name:
            return graph.by_name[candidate]
        if candidate in graph.producer:
            return graph.producer[candidate]
    return None


def _conv_behind(node: Any, graph: OnnxGraph) -> Any:
    """The conv a fused node computes: walk back from its last op (ReLU, BN, ...) along first inputs."""
    for _ in range(6):
        if node is None or node.op_type in CONV_OPS:
            return node
        if node.op_type not in FUSED_INTO_CONV or not node.inputs:
            return None
        node = graph.producer.get(node.inputs[0])
    return node if node is not None and node.op_type in CONV_OPS else None


def _name_layer(path: str, is_conv: bool) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    if leaf in SFCONV_PARTS and parent:
        return parent, "sfconv"
    return path, "conv" if is_conv else "other"


def node_layers(nodes: Sequence[Mapping[str, Any]], graph: OnnxGraph | None) -> list[tuple[str, str, Any]]:
    """(layer, kind, original conv node or None) for each profiled node, in order (see the module doc)."""
    out: list[tuple[str, str, Any] | None] = []
    for n in nodes:
        name, op = str(n["name"]), str(n.get("op", ""))
        parts = name.split(" + ")  # TensorRT joins fused layers' ONNX names
        original = _original(parts[0], graph)
        conv = None
        if original is not None:
            conv = original if original.op_type in CONV_OPS else (_conv_behind(original, graph) if op in CONV_OPS
                                                                   else None)
            path = module_path((conv or original).name)
            out.append((*_name_layer(path, conv is not None), conv))
        elif graph is None or len(parts) > 1 or name.startswith("/"):
            part = next((p for p in parts if p.rsplit("/", 1)[-1].startswith(CONV_OPS)), parts[0])
            is_conv = op in CONV_OPS or part.rsplit("/", 1)[-1].startswith(CONV_OPS)
            out.append((*_name_layer(module_path(part), is_conv), None))
        else:
            out.append(None)  # inserted by the runtime (layout reorders): charged below
    resolved: list[tuple[str, str, Any]] = []
    for i, item in enumerate(out):
        if item is not None:
            resolved.append(item)
            continue
        op = str(nodes[i].get("op", ""))
        step = 1 if "Input" in op else -1  # ReorderInput serves the layer after it, ReorderOutput the one before
        j = i + step
        while 0 <= j < len(out) and out[j] is None:
            j += step
        if 0 <= j < len(out):
            resolved.append((out[j][0], out[j][1], None))  # type: ignore[index]
        else:
            resolved.append((f"(runtime) {op or nodes[i]['name']}", "runtime", None))
    return resolved


def _macs(node: Mapping[str, Any], conv: Any, graph: OnnxGraph | None) -> int | None:
    """MACs of one profiled conv node: the original weight's size times the output (input, transposed) pixels."""
    if conv is None or graph is None or len(conv.inputs) < 2 or conv.inputs[1] not in graph.initializers:
        return None
    weight = math.prod(graph.initializers[conv.inputs[1]][0])
    shapes = node.get("inputs" if conv.op_type == "ConvTranspose" else "outputs") or []
    if not shapes or len(shapes[0]) != 4:
        return None
    n, _, h, w = shapes[0]
    return int(n * h * w * weight)


def layer_profile(times: Mapping[str, Any], label: str, backend: str, precision: str,
                  graph: OnnxGraph | None = None) -> LayerProfile:
    """Per-node times of several runs (a runner's :meth:`layer_times`) -> one row per layer, medians over runs."""
    nodes = list(times["nodes"])
    if not nodes or not times["runs"]:
        raise SfedgeError(f"{label}: the runtime profiler recorded no node", "run more inferences (--runs)")
    names = node_layers(nodes, graph)
    order: list[str] = []
    per_run: dict[str, np.ndarray] = {}
    info: dict[str, LayerRow] = {}
    for node, (layer, kind, conv) in zip(nodes, names):
        if layer not in info:
            order.append(layer)
            info[layer] = LayerRow(layer, kind, 0.0)
            per_run[layer] = np.zeros(len(times["runs"]))
        row = info[layer]
        if kind == "sfconv" or (kind == "conv" and row.kind == "other"):
            row.kind = kind
        row.nodes.append(str(node["name"]))
        row.ops.append(str(node.get("op", "")))
        per_run[layer] += np.asarray(node["ms"], dtype=float)
        macs = _macs(node, conv, graph)
        if macs is not None:
            row.macs = (row.macs or 0) + macs
    for layer in order:
        info[layer].ms = float(np.median(per_run[layer]))
    source = f"{backend} profiler"
    return LayerProfile(label, backend, precision, source, [info[k] for k in order], len(times["runs"]),
                        float(np.median(times["runs"])))


def measure_layers(subject: Subject, config: MeasureConfig | None = None,
                   progress: Progress | None = None) -> LayerProfile:
    """Profile ``subject`` per layer with its runtime's profiler, in a worker process of its own.

    The worker loads the artifact with ``profile_layers``, warms up like a
    latency measurement, runs ``max(20, config.runs)`` more inferences and
    returns their per-node times (the profiler's clock, which adds a little
    per node; the latency report keeps the unprofiled numbers).
    """
    config = config or MeasureConfig()
    say = progress or (lambda message, fraction=None: None)
    if subject.backend not in PROFILED_BACKENDS:
        raise SfedgeError(f"{subject.label}: {subject.backend} has no runtime profiler sfedge can read",
                          "its per-layer times come from per-layer models (sfedge profile --layers on the workstation)")
    say(f"per-layer profile of {subject.label}", 0.0)
    with WorkerProcess(subject, freeze=False) as worker:
        worker.request("load", path=str(subject.path), backend=subject.backend, threads=config.threads or subject.threads,
                       options={**subject.options, "profile_layers": True},
                       input=str(subject.input) if subject.input else None, runner=subject.runner,
                       sample_interval=config.sample_interval)
        worker.request("warmup", runs=config.warmup_runs, seconds=config.warmup_seconds)
        reply = worker.request("layers", count=max(20, config.runs))
    times = reply.get("layers")
    if times is None:
        raise SfedgeError(f"{subject.label}: the runtime reported no per-layer times", "check the runtime version")
    graph = None
    if subject.backend == "onnxruntime":
        try:
            graph = read_graph(subject.path)
        except (OSError, ValueError, IndexError):
            graph = None
    say(f"per-layer profile of {subject.label}", 1.0)
    return layer_profile(times, subject.label, subject.backend, subject.precision, graph)


def compare_layers(candidate: LayerProfile, baseline: LayerProfile | None) -> dict[str, Any]:
    """The two profiles aligned by layer (baseline order, then layers only the candidate has), with ratios.

    Per row: both times, speed-up (baseline / candidate), both MACs, the MAC
    ratio and the achieved fraction of it, and both GMAC/s.  Without a
    baseline (an unpaired configuration) the baseline columns are empty.
    """
    rows = []
    base_rows = baseline.rows if baseline is not None else []
    layers = [r.layer for r in base_rows] + [r.layer for r in candidate.rows if baseline is None
                                             or baseline.row(r.layer) is None]
    for layer in layers:
        a, b = candidate.row(layer), baseline.row(layer) if baseline is not None else None
        speedup = b.ms / a.ms if a and b and a.ms > 0 else None
        mac_ratio = b.macs / a.macs if a and b and a.macs and b.macs else None
        rows.append({
            "layer": layer, "kind": (a or b).kind if a is None or a.kind != "other" else (b or a).kind,  # type: ignore[union-attr]
            "candidate_ms": a.ms if a else None, "baseline_ms": b.ms if b else None, "speedup": speedup,
            "candidate_macs": a.macs if a else None, "baseline_macs": b.macs if b else None, "mac_ratio": mac_ratio,
            "achieved": speedup / mac_ratio if speedup and mac_ratio else None,
            "candidate_gmacs": a.gmacs if a else None, "baseline_gmacs": b.gmacs if b else None,
            "candidate_ops": a.ops if a else [], "baseline_ops": b.ops if b else [],
        })
    return {"candidate": candidate.as_dict(), "baseline": baseline.as_dict() if baseline else None, "rows": rows,
            "candidate_label": candidate.label, "baseline_label": baseline.label if baseline else "-",
            "source": candidate.source}


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def comparison_markdown(comparison: Mapping[str, Any]) -> list[str]:
    """Markdown lines of one aligned comparison (a row per layer, then the totals)."""
    cand, base = comparison["candidate"], comparison["baseline"] or {"layer_sum_ms": float("nan"), "runs": 0,
                                                                       "run_ms": float("nan"), "notes": []}
    lines = [f"### {comparison['candidate_label']} vs {comparison['baseline_label']} ({comparison['source']})", "",
             "| layer | kind | candidate ms | baseline ms | speed-up | MAC ratio | achieved | candidate GMAC/s | "
             "baseline GMAC/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {_f(r['candidate_ms'], '.3f')} | {_f(r['baseline_ms'], '.3f')} | "
                     f"{_f(r['speedup'], '.2f')} | {_f(r['mac_ratio'], '.2f')} | {_f(r['achieved'], '.2f')} | "
                     f"{_f(r['candidate_gmacs'], '.1f')} | {_f(r['baseline_gmacs'], '.1f')} |")
    lines.append(f"| **sum of layers** | | {cand['layer_sum_ms']:.3f} | {base['layer_sum_ms']:.3f} | "
                 f"{base['layer_sum_ms'] / cand['layer_sum_ms']:.2f} | | | | |")
    lines += ["", f"Profiled runs: {cand['runs']} and {base['runs']}; median run {cand['run_ms']:.3f} ms and "
                  f"{base['run_ms']:.3f} ms on the profiler's clock ({comparison['source']})."]
    for n in [*cand.get("notes", []), *base.get("notes", [])]:
        lines.append(f"- {n}")
    return lines


def profile_from_table(table: Any, ranks: Mapping[str, int | None], label: str, measured_ms: float | None = None,
                       ) -> LayerProfile:
    """A per-layer profile from a latency table (per-layer models): each layer at its rank, plus the unchanged rest.

    ``table`` is a :class:`sfedge.profile.latency_table.LatencyTable` measured
    for the model's dense structure; ``ranks`` the configuration's SFConv
    layers (the others dense).  The rest row is the whole dense model minus
    its layers, as the table defines it.
    """
    rows = []
    for e in table.layers:
        r = ranks.get(e.name)
        rows.append(LayerRow(e.name, "conv" if r is None else "sfconv", e.ms(r), e.shape.macs(r),
                             ops=["Conv"] if r is None else ["Conv 1xk", "Conv kx1"]))
    rows.append(LayerRow("(rest: whole dense model minus its layers)", "other", table.rest_ms))
    notes = ["per-layer models: each layer alone at its real input shape, paired with its dense twin; the rest is the "
             "same for both by construction"]
    predicted = table.predict(ranks)
    if measured_ms is not None:
        notes.append(f"table predicts {predicted:.3f} ms for the whole model, measured {measured_ms:.3f} ms "
                     f"({predicted / measured_ms - 1:+.1%})")
    return LayerProfile(label, table.backend, table.precision, "per-layer models", rows, 1,
                        measured_ms if measured_ms is not None else predicted, notes)
