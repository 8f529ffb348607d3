"""Parity: how far an artifact's outputs are from the fp32 torch reference, judged by what the output means.

Numpy only (runs on devices).  Every place that decides whether an artifact is
good enough goes through two functions here: :func:`measure` (run the inputs
through a runner, compare with the reference) and :func:`gate` (hold a
:class:`Parity` to a :class:`Tolerance`; on a miss, delete what it was given
and raise :class:`ParityError`).  The build stages, the on-device engine build
and ``verify`` all use them, so a change to how parity is judged is one change.

**What the output means** (the model's *task*, :data:`TASKS`) decides the mask
metric, because a segmentation engineer judges a quantized artifact by its
masks:

* ``binary``: one channel of logits; the mask is ``logit > threshold`` (0:
  probability 0.5); metric: Dice of the artifact's mask against the reference's;
* ``multiclass``: C channels of class scores; the mask is the argmax; metric:
  Dice per class and their mean over the classes present in the reference
  (class 0, the background by convention, left out of the mean when other
  classes are present: MONAI's ``include_background=False``);
* ``multilabel``: C independent channels (per-channel sigmoid); metric: Dice
  per channel, mean over the channels present in the reference;
* ``regression``: no masks; relative error, cosine and PSNR.

When the reference masks are (nearly) empty (fewer than
:data:`MIN_MASK_PIXELS` foreground pixels, or only the background class), a
Dice says nothing (1.0 for two empty masks, 0.0 for one stray pixel), so the
mask metric is not computed (``dice_agreement`` is None, ``masks_judged`` is
False) and the gate judges the numeric criteria instead (cosine).

Errors are judged against the output's range: untrained, near-constant models
hide conversion bugs (a wrongly converted untrained SFConv U-Net was off by
6e-5 on an output range of 0.01), and a model with large logits shows float
rounding of 1e-4 that is no error at all; so fp32 is gated on the max abs
error *relative to the reference range* (``relative_max_abs``) plus cosine.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sfedge.errors import ConfigError, ParityError

__all__ = [
    "Parity", "Tolerance", "DEFAULT_TOLERANCES", "TOLERANCE_KEYS", "TASKS", "MIN_MASK_PIXELS", "tolerance_for",
    "parse_tolerance_overrides", "detect_task", "compare_outputs", "mask_dice", "measure", "gate", "Scorer",
]

TASKS = ("binary", "multiclass", "multilabel", "regression")
# Fewer foreground pixels than this in the reference masks (summed over the samples): masks are not judged.
MIN_MASK_PIXELS = 64


@dataclass
class Parity:
    """Agreement of an artifact with the reference on a set of inputs.

    The numeric fields are always there; the mask fields depend on the task
    (None for regression, and when the reference masks are too empty to judge).
    """

    max_abs: float
    mean_abs: float
    cosine: float
    dice_agreement: float | None  # the task's mask agreement (see the module docstring), None when not judged
    reference_range: float  # max - min of the reference outputs
    samples: int
    task: str = "binary"
    masks_judged: bool = True
    mask_note: str = ""  # why masks were not judged
    per_class: list[float | None] | None = None  # multiclass / multilabel: Dice per class (None: absent in both)
    relative_error: float = 0.0  # ||output - reference|| / ||reference||
    psnr: float = math.inf  # 20 log10(reference range / RMS error), dB

    @property
    def relative_max_abs(self) -> float:
        return self.max_abs / self.reference_range if self.reference_range > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_max_abs"] = self.relative_max_abs
        return d

    def summary(self) -> str:
        """One line: the figures that matter for this task."""
        mask = (f"mask Dice {self.dice_agreement:.4f}" if self.dice_agreement is not None
                else ("masks not judged" if self.task != "regression" else f"PSNR {self.psnr:.1f} dB"))
        return f"{mask}, cosine {self.cosine:.6f}, max abs {self.max_abs:.3g} ({self.relative_max_abs:.2g} of range)"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Parity | None:
        """The Parity a manifest or report recorded (None when it recorded none)."""
        if not d:
            return None
        names = [f.name for f in fields(cls)]
        required = ("max_abs", "mean_abs", "cosine", "dice_agreement", "reference_range", "samples")
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"parity record lacks {', '.join(missing)}")
        return cls(**{n: d[n] for n in names if n in d})


@dataclass(frozen=True)
class Tolerance:
    """Parity a precision must reach against the fp32 torch model (None: not checked).

    ``dice_agreement`` is checked only where masks can be judged; where they
    cannot (empty reference masks, a regression output), ``fallback_cosine``
    is checked instead, so a mask tolerance is never met by accident.
    """

    max_abs: float | None = None  # largest |artifact - torch| allowed
    relative_max_abs: float | None = None  # the same, as a fraction of the reference's range
    cosine: float | None = None  # smallest cosine similarity allowed
    dice_agreement: float | None = None  # smallest mask agreement allowed (the task's metric)
    fallback_cosine: float | None = None  # checked instead of dice_agreement where masks cannot be judged
    psnr: float | None = None  # smallest PSNR (dB) allowed
    # The mask agreement required on the *shifted* held-out split (augmented: other scale, exposure, blur...);
    # None: the same as dice_agreement.  Not checked by failures() itself: see for_shifted().
    shifted_dice_agreement: float | None = None

    def for_shifted(self) -> Tolerance:
        """The tolerance the shifted held-out split is gated with: this one, its mask floor the shifted one."""
        if self.shifted_dice_agreement is None:
            return replace(self, shifted_dice_agreement=None)
        return replace(self, dice_agreement=self.shifted_dice_agreement, shifted_dice_agreement=None)

    def failures(self, parity: Parity | Mapping[str, Any]) -> list[str]:
        """Human-readable reasons ``parity`` misses this tolerance (empty when it passes)."""
        p = parity if isinstance(parity, Parity) else Parity.from_dict(parity)
        if p is None:
            return ["no parity was measured"]
        out = []
        if self.max_abs is not None and not p.max_abs <= self.max_abs:
            out.append(f"max abs {p.max_abs:.3g} > {self.max_abs:g}")
        if self.relative_max_abs is not None and not p.relative_max_abs <= self.relative_max_abs:
            out.append(f"max abs {p.max_abs:.3g} is {p.relative_max_abs:.3g} of the output range "
                       f"({p.reference_range:.3g}) > {self.relative_max_abs:g}")
        if self.cosine is not None and not p.cosine >= self.cosine:
            out.append(f"cosine {p.cosine:.6f} < {self.cosine:g}")
        if self.dice_agreement is not None:
            if p.dice_agreement is not None:
                if not p.dice_agreement >= self.dice_agreement:
                    out.append(f"{p.task} mask Dice agreement {p.dice_agreement:.4f} < {self.dice_agreement:g}")
            else:
                floor = self.fallback_cosine if self.fallback_cosine is not None else 0.99
                if not p.cosine >= floor:
                    out.append(f"masks cannot be judged ({p.mask_note or p.task}) and cosine {p.cosine:.6f} < {floor:g}")
        if self.psnr is not None and not p.psnr >= self.psnr:
            out.append(f"PSNR {p.psnr:.1f} dB < {self.psnr:g}")
        return out

    def as_dict(self) -> dict[str, float]:
        """The keys that are checked (None values dropped), as target files and manifests write them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


TOLERANCE_KEYS = tuple(f.name for f in fields(Tolerance))
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(relative_max_abs=1e-4, cosine=0.99999),
    "fp16": Tolerance(cosine=0.999, dice_agreement=0.99, fallback_cosine=0.999),
    "int8": Tolerance(dice_agreement=0.98, fallback_cosine=0.99, shifted_dice_agreement=0.97),
    "int8-dynamic": Tolerance(dice_agreement=0.98, fallback_cosine=0.99, shifted_dice_agreement=0.97),
}


def tolerance_for(tolerances: Mapping[str, Tolerance | Mapping[str, float]], precision: str,
                  overrides: Mapping[str, float] | None = None) -> Tolerance:
    """The tolerance a (parsed or manifest-recorded) table sets for ``precision`` (else the default), with ``overrides``."""
    tol = tolerances.get(precision)
    if isinstance(tol, Tolerance):
        base = tol
    else:
        base = Tolerance(**tol) if tol else DEFAULT_TOLERANCES.get(precision, Tolerance())
    if not overrides:
        return base
    return Tolerance(**{**asdict(base), **overrides})


def parse_tolerance_overrides(items: Iterable[str]) -> dict[str, float]:
    """``["relative_max_abs=2e-4", "dice_agreement=0.97"]`` (the CLI's --tolerance) -> a dict, checked."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in TOLERANCE_KEYS:
            raise ConfigError(f"--tolerance {item!r} is not KEY=VALUE with a known key",
                              f"keys: {', '.join(TOLERANCE_KEYS)}; e.g. --tolerance dice_agreement=0.97")
        try:
            number = float(value)
        except ValueError as err:
            raise ConfigError(f"--tolerance {item!r}: {value!r} is not a number", "e.g. relative_max_abs=2e-4") from err
        if not math.isfinite(number) or number < 0:
            raise ConfigError(f"--tolerance {item!r} must be a finite, non-negative number", "e.g. cosine=0.999")
        out[key] = number
    return out


def detect_task(output_shape: tuple[int, ...] | list[int]) -> str:
    """The task an output shape suggests: one channel is ``binary``, several are ``multiclass``.

    Several independent channels (``multilabel``) or a continuous output
    (``regression``) look the same from the shape: pass the task explicitly.
    """
    channels = int(output_shape[1]) if len(output_shape) >= 2 else 1
    return "binary" if channels == 1 else "multiclass"


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty: callers decide whether empty masks can be judged)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def _masks(ref: np.ndarray, out: np.ndarray, task: str, threshold: float) -> tuple[float | None, list | None, str]:
    """(mask agreement, per-class Dice, why not judged) for ``task``."""
    if task == "regression":
        return None, None, "a regression output has no masks"
    if task == "binary":
        a, b = ref > threshold, out > threshold
        if int(a.sum()) < MIN_MASK_PIXELS:
            return None, None, f"the reference masks have {int(a.sum())} foreground pixels"
        return mask_dice(a, b), None, ""
    channels = ref.shape[1] if ref.ndim >= 2 else 1
    if task == "multilabel":
        per: list[float | None] = []
        present = []
        for c in range(channels):
            a, b = ref[:, c] > threshold, out[:, c] > threshold
            per.append(mask_dice(a, b) if a.any() or b.any() else None)
            if int(a.sum()) >= MIN_MASK_PIXELS:
                present.append(c)
        if not present:
            return None, per, "no channel of the reference masks has foreground"
        return float(np.mean([per[c] for c in present])), per, ""
    if task == "multiclass":
        a, b = ref.argmax(axis=1), out.argmax(axis=1)
        per = []
        counts = []
        for c in range(channels):
            ac, bc = a == c, b == c
            per.append(mask_dice(ac, bc) if ac.any() or bc.any() else None)
            counts.append(int(ac.sum()))
        present = [c for c in range(channels) if counts[c] >= MIN_MASK_PIXELS]
        foreground = [c for c in present if c != 0]
        if not foreground:
            return None, per, "the reference masks hold only the background class"
        return float(np.mean([per[c] for c in foreground])), per, ""
    raise ConfigError(f"unknown task '{task}'", f"valid tasks: {', '.join(TASKS)}")


def compare_outputs(reference: np.ndarray, output: np.ndarray, task: str = "binary", threshold: float = 0.0) -> Parity:
    """The parity of ``output`` against ``reference`` (same shape, N first) for ``task``.

    ``threshold`` applies to binary and multilabel logits (0: probability 0.5).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'", f"valid tasks: {', '.join(TASKS)}")
    ref = np.asarray(reference, np.float64)
    out = np.asarray(output, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} differs from reference {ref.shape}")
    diff = np.abs(ref - out)
    ref_norm, out_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(out))
    cosine = float(np.dot(ref.ravel(), out.ravel()) / (ref_norm * out_norm)) if ref_norm * out_norm > 0 \
        else float(np.array_equal(ref, out))
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    rms = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
    dice, per, note = _masks(ref, out, task, threshold)
    return Parity(
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        dice_agreement=dice,
        reference_range=span,
        samples=int(ref.shape[0]) if ref.ndim else 1,
        task=task,
        masks_judged=dice is not None,
        mask_note=note,
        per_class=per,
        relative_error=float(np.linalg.norm(ref - out) / ref_norm) if ref_norm > 0 else float(out_norm > 0),
        psnr=float(20 * math.log10(span / rms)) if rms > 0 and span > 0 else math.inf,
    )


class Runs(Protocol):
    """Anything that maps float32 NCHW inputs to float32 NCHW outputs (every backend's Runner does)."""

    def run(self, x: np.ndarray) -> np.ndarray: ...


# How a stage scores a file it wrote without importing a runtime itself: (artifact file, inputs, reference) -> Parity.
# The backend that owns the runtime passes one in (e.g. ONNX Runtime for the export and the Q/DQ search).
Scorer = Callable[[Path, np.ndarray, np.ndarray], Parity]


def measure(runner: Runs, inputs: np.ndarray, reference: np.ndarray, task: str = "binary",
            threshold: float = 0.0) -> Parity:
    """Run ``inputs`` through ``runner`` and compare with the torch ``reference`` outputs for ``task``."""
    return compare_outputs(reference, runner.run(inputs), task, threshold)


def gate(
    parity: Parity,
    tolerance: Tolerance,
    what: str,
    *,
    cleanup: Iterable[str | os.PathLike[str]] = (),
    split: str = "held-out",
) -> Parity:
    """Return ``parity`` if it meets ``tolerance``; else delete ``cleanup`` and raise ParityError naming ``what``.

    ``split`` names the inputs in the message ("shifted held-out" for the
    augmented split, gated with ``tolerance.for_shifted()``).

    Why delete here: an artifact that missed its tolerance must not be left
    where it looks whole (a later run or a user would take it for a checked
    one), and every stage forgetting that in its own way is how it happens.
    """
    failures = tolerance.failures(parity)
    if failures:
        for path in cleanup:
            _remove(Path(path))
        raise ParityError(
            f"{what} disagrees with the torch model on the {split} split: {'; '.join(failures)}",
            "loosen the target's [tolerances] (or --tolerance KEY=VALUE) only if you accept this, "
            "or use another precision",
        )
    return parity


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
