"""ONNX Runtime, build side: fp32 / int8 / fp16 ONNX artifacts, each gated against torch.

* fp32: :func:`sfedge.export.export_onnx`;
* int8: export, then explicit Q/DQ (:mod:`sfedge.quantize.qdq`) with the
  shared mixed-precision search (:func:`sfedge.quantize.mixed.mixed_precision`);
  the same Q/DQ file is what TensorRT builds from;
* fp16: export, then an fp16 graph with float32 I/O (for TensorRT's
  strongly-typed mode).  ONNX Runtime 1.31's CPU EP runs it, but by inserting
  casts to float32 around the kernels it has only in float32 (all convs on
  x86): the numerics of fp16 storage at fp32 speed, so it is useful here for
  parity, not for latency.  A graph with an op the CPU EP cannot run at all
  raises :class:`BackendUnavailable` when loaded.

Every artifact's parity is measured with :class:`OnnxRuntimeRunner` (the
scorer :func:`ort_scorer` hands to the export and quantize stages) on the
calibration set's held-out split against the fp32 torch outputs and gated
with the target's tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfedge.artifact import Artifact
from sfedge.backends.onnxruntime.runner import OnnxRuntimeRunner
from sfedge.calibration import CalibrationSet
from sfedge.errors import UnknownNameError
from sfedge.export import export_onnx
from sfedge.parity import Parity, Scorer, gate, measure
from sfedge.progress import Progress, scaled
from sfedge.quantize.mixed import PROBE_SAMPLES, mixed_precision
from sfedge.quantize.qdq import to_fp16
from sfedge.quantize.ranges import compute_ranges
from sfedge.quantize.search import DEFAULT_MAX_FLOAT_FRACTION
from sfedge.source import ModelSource
from sfedge.targets import Target

__all__ = ["make", "ort_scorer", "PRECISIONS"]

PRECISIONS = ("fp32", "int8", "fp16")


def ort_scorer(threads: int | None = None, task: str = "binary") -> Scorer:
    """A scorer that runs an ONNX file in ONNX Runtime (CPU) at ``threads`` and judges it for ``task``."""

    def score(path: Path, inputs: np.ndarray, reference: np.ndarray) -> Parity:
        with OnnxRuntimeRunner(path, threads=threads) as runner:
            return measure(runner, inputs, reference, task)

    return score


def make(
    source: ModelSource,
    target: Target,
    precision: str,
    calibration: CalibrationSet,
    workdir: Path,
    *,
    progress: Progress | None = None,
    method: str = "entropy",
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION,
) -> Artifact:
    """Build the ONNX Runtime artifact for ``precision`` in ``workdir``, gated on the held-out split.

    ``method`` is the int8 calibration method (entropy, percentile, minmax);
    ``max_float_fraction`` the mixed-precision search's float budget.
    Raises ParityError (and leaves no file of the artifact) when it misses
    ``target.tolerance(precision)``.  The int8 artifact's ``float_layers`` are
    the layers the search kept in float; its ``meta`` holds the calibration
    method, the ranges file name and the search's steps and ranking.
    """
    if precision not in PRECISIONS:
        raise UnknownNameError("precision for onnxruntime", precision, list(PRECISIONS))
    workdir = Path(workdir)
    stem = f"{source.name}-{source.weights_sha256[:8]}"
    holdout = calibration.holdout
    reference = source.reference(holdout)
    score = ort_scorer(target.threads, source.task)
    fp32 = export_onnx(source, workdir / f"{stem}.onnx", score=score, tolerance=target.tolerance("fp32"),
                       check_inputs=holdout, progress=scaled(progress, 0.0, 0.3))
    if precision == "fp32":
        artifact = fp32
    elif precision == "fp16":
        artifact = to_fp16(fp32, workdir / f"{stem}-fp16.onnx")
        artifact.notes.append("ONNX Runtime's CPU EP runs fp16 by casting to float32 around its kernels: "
                              "fp16 numerics, fp32 speed")
        artifact.parity = score(artifact.path, holdout, reference)
    else:
        ranges = compute_ranges(fp32.path, calibration, method, progress=scaled(progress, 0.3, 0.1))
        probe = calibration.calibration[:PROBE_SAMPLES]
        artifact, _ = mixed_precision(
            fp32, calibration, workdir / f"{stem}-int8.onnx", reference=reference,
            probe_reference=source.reference(probe), tolerance=target.tolerance(precision), score=score,
            ranges=ranges, method=method, max_float_fraction=max_float_fraction, progress=scaled(progress, 0.4, 0.6),
        )
    assert artifact.parity is not None
    gate(artifact.parity, target.tolerance(precision), f"the {precision} ONNX Runtime artifact {artifact.path.name}",
         cleanup=artifact.companions)
    return artifact
