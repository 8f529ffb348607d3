"""Per-layer INT8 sensitivity and mixed precision: keep the layers INT8 hurts most in float.

Factorized models lose more accuracy in INT8 than dense ones: the rank-r
bottleneck between an SFConv's 1xk and kx1 convs carries the whole layer's
signal through few channels, so its quantization noise is not averaged away.
Rather than give up INT8 for the whole model, :func:`layer_sensitivity`
quantizes *one* layer at a time (everything else float) and measures the
model output against the fp32 torch reference on held-out samples;
:func:`mixed_precision` then quantizes everything and moves the most sensitive
layers back to float, one at a time, until the target's tolerance is met.

Cost: one Q/DQ file and one ONNX Runtime pass over the samples per layer
(about a second per layer for a small U-Net at 256x256 on 2 cores); pass
``samples`` to rank on a subset of the held-out split (the final check always
uses all of it).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.base import Artifact
from sfedge.quantize.qdq import measure_onnx_parity, quantizable_layers, quantize_qdq
from sfedge.quantize.ranges import compute_ranges

__all__ = ["LayerSensitivity", "MixedPrecisionReport", "layer_sensitivity", "mixed_precision", "layer_role"]

Progress = Callable[[str, "float | None"], None]


@dataclass
class LayerSensitivity:
    """Output error of the model when only ``layer`` runs in INT8 (the rest float)."""

    layer: str
    op_type: str
    role: str  # what the layer is in the model (see layer_role)
    max_abs: float
    mean_abs: float
    cosine: float
    dice_agreement: float
    samples: int

    @property
    def score(self) -> float:
        """The ranking key (higher = more sensitive): mean |error| of the output logits.

        Mean error rather than mask Dice: with one layer quantized most masks
        barely change, and the continuous error still orders layers by the
        noise they add, which is what accumulates when all are quantized.
        """
        return self.mean_abs

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["score"] = self.score
        return d


@dataclass
class MixedPrecisionReport:
    """What mixed precision did: the sensitivity ranking, each step's parity, the layers left in float."""

    method: str
    tolerance: dict[str, float | None]
    met: bool
    float_layers: list[str]
    layers: int
    all_int8_parity: dict[str, float]
    parity: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    sensitivity_samples: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sensitivity"] = [s.as_dict() for s in self.sensitivity]
        return d


def layer_role(name: str, op_type: str) -> str:
    """A readable role from the TorchScript export's node name (module path) and op type."""
    if op_type == "ConvTranspose":
        return "up (transposed conv)"
    if "/conv_a/" in name:
        return "sfconv 1xk (to rank r)"
    if "/conv_b/" in name:
        return "sfconv kx1 (rank-r input)"
    if name.startswith("/head/"):
        return "head (1x1)"
    if op_type in ("MatMul", "Gemm"):
        return "linear"
    return "dense conv"


def layer_sensitivity(
    onnx_artifact: Artifact,
    calib: Any,
    reference: np.ndarray,
    *,
    method: str = "entropy",
    ranges: dict[str, float] | None = None,
    layers: list[str] | None = None,
    samples: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[LayerSensitivity]:
    """Rank the quantizable layers of ``onnx_artifact`` by the output error INT8 causes in each alone.

    ``reference`` holds the fp32 torch outputs for ``calib.holdout``; ``samples``
    limits the ranking to the first N held-out samples.  Most sensitive first.
    """
    import onnx

    ranges = ranges if ranges is not None else compute_ranges(onnx_artifact.path, calib, method, progress=progress)
    model = onnx.load(str(onnx_artifact.path), load_external_data=False)
    op_types = {n.name: n.op_type for n in model.graph.node}
    candidates = quantizable_layers(model)
    layers = list(layers) if layers is not None else candidates
    n = len(calib.holdout) if samples is None else max(1, min(samples, len(calib.holdout)))
    inputs, ref = calib.holdout[:n], reference[:n]
    out = []
    with tempfile.TemporaryDirectory(prefix="sfedge-sens-") as tmp:
        for i, layer in enumerate(layers):
            _tell(progress, f"sensitivity {i + 1}/{len(layers)}: {layer}", i / max(1, len(layers)))
            others = [c for c in candidates if c != layer]
            qdq = quantize_qdq(onnx_artifact, calib, Path(tmp) / "one.onnx", method=method, float_nodes=others,
                               ranges=ranges, write_ranges_file=False)
            p = measure_onnx_parity(qdq.path, inputs, ref, threads)
            out.append(LayerSensitivity(layer, op_types[layer], layer_role(layer, op_types[layer]), p.max_abs,
                                        p.mean_abs, p.cosine, p.dice_agreement, n))
    out.sort(key=lambda s: s.score, reverse=True)
    _tell(progress, "sensitivity done", 1.0)
    return out


def mixed_precision(
    onnx_artifact: Artifact,
    calib: Any,
    path: str | Path,
    reference: np.ndarray,
    tolerance: Any,
    *,
    method: str = "entropy",
    ranges: dict[str, float] | None = None,
    sensitivity_samples: int | None = None,
    max_float_layers: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[Artifact, MixedPrecisionReport]:
    """INT8 Q/DQ at ``path`` with the fewest most-sensitive layers in float that meet ``tolerance``.

    Greedy: quantize every layer; while ``tolerance.failures(parity)`` is not
    empty, move the next layer of the sensitivity ranking to float.  Parity is
    measured in ONNX Runtime on all of ``calib.holdout`` against ``reference``
    (fp32 torch outputs).  The report says whether the tolerance was met
    (``met``; the caller decides whether a miss is an error) and which layers
    stayed float.
    """
    start = time.perf_counter()
    ranges = ranges if ranges is not None else compute_ranges(onnx_artifact.path, calib, method, progress=progress)
    path = Path(path)
    holdout = calib.holdout

    def build(float_nodes: list[str]) -> Artifact:
        return quantize_qdq(onnx_artifact, calib, path, method=method, float_nodes=float_nodes, ranges=ranges,
                            reference=reference, threads=threads)

    _tell(progress, "quantizing every layer to int8", 0.05)
    artifact = build([])
    all_int8 = dict(artifact.parity)
    steps = [{"float_layers": 0, "added": None, **_brief(artifact.parity)}]
    sensitivity = layer_sensitivity(
        onnx_artifact, calib, reference, method=method, ranges=ranges, samples=sensitivity_samples, threads=threads,
        progress=(lambda m, f: _tell(progress, m, None if f is None else 0.1 + 0.6 * f)),
    )
    limit = len(sensitivity) if max_float_layers is None else min(max_float_layers, len(sensitivity))
    float_nodes: list[str] = []
    while tolerance.failures(artifact.parity) and len(float_nodes) < limit:
        nxt = sensitivity[len(float_nodes)].layer
        float_nodes.append(nxt)
        _tell(progress, f"keeping {len(float_nodes)} layer(s) in float ({nxt})", 0.7 + 0.3 * len(float_nodes) / max(1, limit))
        artifact = build(float_nodes)
        steps.append({"float_layers": len(float_nodes), "added": nxt, **_brief(artifact.parity)})
    met = not tolerance.failures(artifact.parity)
    report = MixedPrecisionReport(
        method=method, tolerance=asdict(tolerance),
        met=met, float_layers=list(artifact.float_layers), layers=len(sensitivity),
        all_int8_parity=all_int8, parity=dict(artifact.parity), steps=steps, sensitivity=sensitivity,
        sensitivity_samples=sensitivity[0].samples if sensitivity else len(holdout),
        seconds=round(time.perf_counter() - start, 2),
    )
    artifact.meta.update({"mixed_precision_met": met, "all_int8_parity": all_int8})
    _tell(progress, f"mixed precision: {len(float_nodes)} layer(s) in float, target {'met' if met else 'missed'}", 1.0)
    return artifact, report


def _brief(parity: dict[str, float]) -> dict[str, float]:
    return {k: parity[k] for k in ("dice_agreement", "cosine", "max_abs", "mean_abs") if k in parity}


def _tell(progress: Progress | None, message: str, fraction: float | None) -> None:
    if progress is not None:
        progress(message, fraction)
