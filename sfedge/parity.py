"""Parity: how far an artifact's outputs are from the fp32 torch reference, and the one gate that judges it.

Numpy only (runs on devices).  Errors are judged against the output's range
(untrained, near-constant models hide conversion bugs: a wrongly converted untrained
SFConv U-Net was off by 6e-5 on an output range of 0.01), and for
segmentation the figure users care about is the agreement of thresholded masks.

Every place that decides whether an artifact is good enough goes through two
functions here: :func:`measure` (run the inputs through a runner, compare
with the reference) and :func:`gate` (hold a :class:`Parity` to a
:class:`Tolerance`; on a miss, delete what it was given and raise
:class:`ParityError`).  The build stages, the on-device engine build and
``verify`` all use them, so a change to how parity is judged is one change.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sfedge.errors import ParityError

__all__ = [
    "Parity", "Tolerance", "DEFAULT_TOLERANCES", "TOLERANCE_KEYS", "tolerance_for", "compare_outputs", "mask_dice",
    "measure", "gate", "Scorer",
]


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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Parity | None:
        """The Parity a manifest or report recorded (None when it recorded none)."""
        if not d:
            return None
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"parity record lacks {', '.join(missing)}")
        return cls(**{n: d[n] for n in names})


@dataclass(frozen=True)
class Tolerance:
    """Parity a precision must reach against the fp32 torch model (None: not checked)."""

    max_abs: float | None = None  # largest |artifact - torch| allowed
    cosine: float | None = None  # smallest cosine similarity allowed
    dice_agreement: float | None = None  # smallest Dice between thresholded masks allowed

    def failures(self, parity: Parity | Mapping[str, float]) -> list[str]:
        """Human-readable reasons ``parity`` misses this tolerance (empty when it passes)."""
        metrics = parity.as_dict() if isinstance(parity, Parity) else parity
        out = []
        if self.max_abs is not None and metrics.get("max_abs", float("inf")) > self.max_abs:
            out.append(f"max abs {metrics.get('max_abs'):.3g} > {self.max_abs:g}")
        if self.cosine is not None and metrics.get("cosine", -1.0) < self.cosine:
            out.append(f"cosine {metrics.get('cosine'):.6f} < {self.cosine:g}")
        if self.dice_agreement is not None and metrics.get("dice_agreement", -1.0) < self.dice_agreement:
            out.append(f"mask Dice agreement {metrics.get('dice_agreement'):.4f} < {self.dice_agreement:g}")
        return out

    def as_dict(self) -> dict[str, float]:
        """The keys that are checked (None values dropped), as target files and manifests write them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


TOLERANCE_KEYS = tuple(f.name for f in fields(Tolerance))
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_abs=1e-4, cosine=0.99999),
    "fp16": Tolerance(cosine=0.999, dice_agreement=0.99),
    "int8": Tolerance(dice_agreement=0.98),
    "int8-dynamic": Tolerance(dice_agreement=0.98),
}


def tolerance_for(tolerances: Mapping[str, Tolerance | Mapping[str, float]], precision: str) -> Tolerance:
    """The tolerance a (parsed or manifest-recorded) ``tolerances`` table sets for ``precision``, else the default."""
    tol = tolerances.get(precision)
    if isinstance(tol, Tolerance):
        return tol
    return Tolerance(**tol) if tol else DEFAULT_TOLERANCES.get(precision, Tolerance())


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


class Runs(Protocol):
    """Anything that maps float32 NCHW inputs to float32 NCHW outputs (every backend's Runner does)."""

    def run(self, x: np.ndarray) -> np.ndarray: ...


# How a stage scores a file it wrote without importing a runtime itself: (artifact file, inputs, reference) -> Parity.
# The backend that owns the runtime passes one in (e.g. ONNX Runtime for the export and the Q/DQ search).
Scorer = Callable[[Path, np.ndarray, np.ndarray], Parity]


def measure(runner: Runs, inputs: np.ndarray, reference: np.ndarray) -> Parity:
    """Run ``inputs`` through ``runner`` and compare with the torch ``reference`` outputs."""
    return compare_outputs(reference, runner.run(inputs))


def gate(
    parity: Parity,
    tolerance: Tolerance,
    what: str,
    *,
    cleanup: Iterable[str | os.PathLike[str]] = (),
) -> Parity:
    """Return ``parity`` if it meets ``tolerance``; else delete ``cleanup`` and raise ParityError naming ``what``.

    Why delete here: an artifact that missed its tolerance must not be left
    where it looks whole (a later run or a user would take it for a checked
    one), and every stage forgetting that in its own way is how it happens.
    """
    failures = tolerance.failures(parity)
    if failures:
        for path in cleanup:
            _remove(Path(path))
        raise ParityError(
            f"{what} disagrees with the torch model on the held-out split: {'; '.join(failures)}",
            "loosen the target's [tolerances] only if you accept this, or use another precision",
        )
    return parity


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
