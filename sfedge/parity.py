"""Parity metrics: how far an artifact's outputs are from the fp32 torch reference.

Numpy only (runs on devices).  Errors are judged against the output's range
(TOOLCHAIN.md: untrained, near-constant models hide conversion bugs), and for
segmentation the figure users care about is the agreement of thresholded masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Parity", "compare_outputs", "mask_dice"]


@dataclass
class Parity:
    """Agreement of an artifact with the reference on a set of inputs."""

    max_abs: float
    mean_abs: float
    cosine: float
    dice_agreement: float  # Dice between masks (logit > threshold) of reference and artifact
    reference_range: float  # max - min of the reference outputs
    samples: int

    @property
    def relative_max_abs(self) -> float:
        return self.max_abs / self.reference_range if self.reference_range > 0 else float("inf")

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["relative_max_abs"] = self.relative_max_abs
        return d


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def compare_outputs(reference: np.ndarray, output: np.ndarray, threshold: float = 0.0) -> Parity:
    """Max/mean abs difference, cosine and mask Dice agreement of ``output`` vs ``reference``.

    Both are arrays of the same shape (logits; ``threshold`` 0 is probability 0.5).
    """
    ref = np.asarray(reference, np.float64)
    out = np.asarray(output, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} differs from reference {ref.shape}")
    diff = np.abs(ref - out)
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(np.dot(ref.ravel(), out.ravel()) / denom) if denom > 0 else float(np.array_equal(ref, out))
    return Parity(
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        dice_agreement=mask_dice(ref > threshold, out > threshold),
        reference_range=float(ref.max() - ref.min()) if ref.size else 0.0,
        samples=int(ref.shape[0]) if ref.ndim else 1,
    )
