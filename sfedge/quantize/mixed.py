"""Mixed precision for explicit Q/DQ ONNX: the ONNX side of the one precision search.

:class:`QdqSearch` adapts :func:`sfedge.quantize.qdq.quantize_qdq` to
:class:`sfedge.quantize.search.SearchAdapter`: a candidate is the Q/DQ file
with some layers left float, a probe is a Q/DQ file with one layer alone in
int8, and a layer's cost is its MACs (read from the ONNX graph's shapes).
The runtime that scores the files is passed in (``score``), so this stage
imports no backend.  Used by the ONNX Runtime backend and by the TensorRT
backend (whose Q/DQ graph ONNX Runtime runs exactly as TensorRT's int8
kernels approximate it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import Artifact
from sfedge.calibration import CalibrationSet
from sfedge.parity import Parity, Scorer, Tolerance
from sfedge.progress import Progress
from sfedge.quantize.qdq import quantizable_layers, quantize_qdq
from sfedge.quantize.search import DEFAULT_MAX_FLOAT_FRACTION, SearchLayer, SearchResult, layer_role, search

__all__ = ["QdqSearch", "mixed_precision", "onnx_layer_macs", "PROBE_SAMPLES"]

PROBE_SAMPLES = 8  # calibration samples the per-layer probes are scored on


class QdqSearch:
    """The Q/DQ ONNX quantizer as a :class:`SearchAdapter`; the last :meth:`build` is the artifact at ``path``."""

    def __init__(self, fp32: Artifact, calib: CalibrationSet, path: Path, ranges: dict[str, float], method: str,
                 score: Scorer, reference: np.ndarray, probe_reference: np.ndarray, workdir: Path) -> None:
        import onnx

        self.fp32, self.calib, self.path, self.ranges, self.method = fp32, calib, Path(path), ranges, method
        self.score, self.reference, self.probe_reference = score, reference, probe_reference
        self.workdir = workdir
        model = onnx.load(str(fp32.path), load_external_data=False)
        self._names = quantizable_layers(model)
        ops = {n.name: n.op_type for n in model.graph.node}
        self._layers = [SearchLayer(n, ops[n], layer_role(n, ops[n])) for n in self._names]
        self._macs = onnx_layer_macs(model)
        self.artifact: Artifact | None = None

    def layers(self) -> Sequence[SearchLayer]:
        return self._layers

    def build(self, float_layers: Sequence[str]) -> Parity:
        self.artifact = quantize_qdq(self.fp32, self.calib, self.path, method=self.method, float_nodes=float_layers,
                                     ranges=self.ranges, reference=self.reference, score=self.score)
        assert self.artifact.parity is not None  # reference and score were given
        return self.artifact.parity

    def probe(self, layer: str) -> Parity:
        others = [n for n in self._names if n != layer]
        one = quantize_qdq(self.fp32, self.calib, self.workdir / "probe.onnx", method=self.method,
                           float_nodes=others, ranges=self.ranges, write_ranges_file=False)
        inputs = self.calib.calibration[: len(self.probe_reference)]
        return self.score(one.path, inputs, self.probe_reference)

    def cost(self, layer: str) -> float:
        return float(self._macs.get(layer, 0))


def mixed_precision(
    fp32: Artifact,
    calib: CalibrationSet,
    path: str | Path,
    *,
    reference: np.ndarray,
    probe_reference: np.ndarray,
    tolerance: Tolerance,
    score: Scorer,
    ranges: dict[str, float],
    method: str = "entropy",
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION,
    costs: Mapping[str, float] | None = None,
    shifted_reference: np.ndarray | None = None,
    progress: Progress | None = None,
) -> tuple[Artifact, SearchResult]:
    """The int8 Q/DQ ONNX at ``path`` with the fewest float layers that meet ``tolerance`` (or the search's best).

    ``reference`` are the torch outputs for ``calib.holdout`` (the gate);
    ``probe_reference`` those for the first samples of ``calib.calibration``
    (the ranking); ``costs`` ({layer: measured ms}) replace the MACs as the
    price of a float layer; with ``shifted_reference`` (torch outputs for
    ``calib.shifted``) a candidate must also meet the shifted split's floor.
    The caller gates the returned artifact.
    """
    with tempfile.TemporaryDirectory(prefix="sfedge-probe-") as tmp:
        adapter = QdqSearch(fp32, calib, Path(path), ranges, method, score, reference, probe_reference, Path(tmp))
        shifted = None
        if shifted_reference is not None and calib.shifted is not None:
            def shifted() -> Parity:
                return score(adapter.path, calib.shifted, shifted_reference)
        result = search(adapter, tolerance, max_float_fraction=max_float_fraction, costs=costs, shifted=shifted,
                        progress=progress)
    artifact = adapter.artifact
    assert artifact is not None  # search always builds at least once
    artifact.meta["mixed_precision"] = {k: v for k, v in result.as_dict().items() if k != "sensitivity"}
    artifact.meta["sensitivity"] = [s.as_dict() for s in result.sensitivity]
    note = result.note()
    if note:
        artifact.notes.append(note)
    return artifact, result


def onnx_layer_macs(model: Any) -> dict[str, int]:
    """MACs per Conv / ConvTranspose / Gemm / MatMul node of a static-shape ONNX graph (0 where shapes are unknown)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        y = shapes.get(node.output[0])
        x = shapes.get(node.input[0])
        if w is None or y is None:
            out[node.name] = 0
        elif node.op_type == "Conv":  # every output element: Ci/groups * kh * kw MACs
            out[node.name] = int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # every input element scatters Co/groups * kh * kw MACs
            out[node.name] = int(np.prod(x)) * int(np.prod(w[1:])) if x else 0
        else:  # Gemm / MatMul with a constant weight: (K, N), or (N, K) for Gemm with transB
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            out[node.name] = int(np.prod(y)) * int(w[1] if trans_b else w[0])
    return out
