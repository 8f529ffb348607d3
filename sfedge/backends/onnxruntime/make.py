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

from dataclasses import replace
from pathlib import Path

import numpy as np

from sfedge.artifact import Artifact
from sfedge.backends.int8 import Int8Options, qdq_int8
from sfedge.backends.onnxruntime.runner import OnnxRuntimeRunner
from sfedge.calibration import CalibrationSet
from sfedge.errors import UnknownNameError
from sfedge.export import export_onnx
from sfedge.parity import Parity, Scorer, gate, measure
from sfedge.progress import Progress, scaled
from sfedge.quantize.qdq import to_fp16
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
    method: str | None = None,
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION,
    int8: Int8Options | None = None,
) -> Artifact:
    """Build the ONNX Runtime artifact for ``precision`` in ``workdir``, gated on the held-out split.

    ``int8`` says how int8 quantizes (QAT steps, calibration methods, float
    costs: :class:`sfedge.backends.int8.Int8Options`); ``method`` (entropy,
    percentile, minmax) restricts the calibration to one method and
    ``max_float_fraction`` sets the mixed-precision search's float budget.
    Where the calibration set has a shifted split, the artifact is gated on
    it too (``tolerance.for_shifted()``).
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
        options = int8 or Int8Options()
        if method is not None:
            options = replace(options, methods=(method,))
        if max_float_fraction != DEFAULT_MAX_FLOAT_FRACTION:
            options = replace(options, max_float_fraction=max_float_fraction)
        artifact, _, _ = qdq_int8(source, fp32, calibration, workdir / f"{stem}-int8.onnx",
                                  tolerance=target.tolerance(precision), fp32_tolerance=target.tolerance("fp32"),
                                  score=score, options=options, progress=scaled(progress, 0.3, 0.7))
    assert artifact.parity is not None
    what = f"the {precision} ONNX Runtime artifact {artifact.path.name}"
    gate(artifact.parity, target.tolerance(precision), what, cleanup=artifact.companions)
    if calibration.has_shifted:
        assert calibration.shifted is not None
        shifted = score(artifact.path, calibration.shifted, source.reference(calibration.shifted))
        artifact.shifted_parity = gate(shifted, target.tolerance(precision).for_shifted(), what,
                                       cleanup=artifact.companions, split="shifted held-out")
    return artifact
