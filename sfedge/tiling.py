"""Tiled (sliding-window) inference for whole images, numpy only: runs on the device as on the workstation.

Bundles have static input shapes (256x256 on host and phone, 512x512 on
Jetson, 128x128 for the Factorizer), while a fundus photograph is about
1400x1400.  :func:`tiled_predict` covers an image with windows of the model's
input size, runs them through any ``predict`` function on float32 NCHW batches
(a torch module on the workstation, or any :class:`sfedge.backends.base.Runner`
on the device through :func:`runner_predictor`), and blends the overlapping
window outputs into one output of the image's size.

The semantics are MONAI's ``sliding_window_inference`` (the anchor users know),
so its results and these agree to float precision:

* windows start every ``int(window * (1 - overlap))`` pixels (at least 1; one
  window when the window equals the image), the last one flush with the far
  edge (``monai.data.utils.dense_patch_slices``);
* an image smaller than the window is padded (``padding_mode`` "constant" with
  ``cval``, "reflect", "replicate" or "circular"; half before, the rest after)
  and the output cropped back;
* window outputs are weighted by an importance map ("constant": ones;
  "gaussian": separable exp(-x^2 / (2 sigma^2)) with sigma = ``sigma_scale`` *
  window, clamped below at 1e-3) and divided by the summed weights;
* windows of all images are processed ``batch`` at a time, images first.

Nothing here imports torch or the build side: this module needs only numpy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sfedge.errors import ConfigError

__all__ = [
    "Tiling", "BLEND_MODES", "PADDING_MODES", "Predict", "tiled_predict", "scan_interval", "window_starts",
    "importance_map", "runner_predictor", "window_count",
]

BLEND_MODES = ("constant", "gaussian")
# torch.nn.functional.pad's names (MONAI's PytorchPadMode) -> numpy.pad's.
PADDING_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}

Predict = Callable[[np.ndarray], np.ndarray]
"""float32 (B, C, *window) -> float32 (B, K, *window): one batch of windows through the model."""


@dataclass(frozen=True)
class Tiling:
    """How to cover an image with windows and blend their outputs (MONAI's parameter names and meaning)."""

    overlap: float = 0.25  # fraction of the window shared by neighbours, in [0, 1)
    mode: str = "gaussian"  # importance map: "constant" or "gaussian"
    sigma_scale: float = 0.125  # gaussian sigma = sigma_scale * window size
    padding_mode: str = "constant"  # for images smaller than the window
    cval: float = 0.0  # fill value of constant padding (in the model's input units)
    batch: int = 1  # windows per predict call

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"tiling overlap must be in [0, 1), got {self.overlap}", "e.g. --overlap 0.25")
        if self.mode not in BLEND_MODES:
            raise ConfigError(f"unknown blending mode '{self.mode}'", f"valid modes: {', '.join(BLEND_MODES)}")
        if not self.sigma_scale > 0:
            raise ConfigError(f"sigma_scale must be > 0, got {self.sigma_scale}", "e.g. 0.125 (MONAI's default)")
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"unknown padding mode '{self.padding_mode}'", f"valid modes: {', '.join(PADDING_MODES)}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"tiling batch must be a positive int, got {self.batch!r}", "e.g. --batch 4")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tiling:
        """Rebuild from :meth:`as_dict` (manifests); unknown keys are an error."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown tiling key(s) {', '.join(sorted(unknown))}",
                              f"valid keys: {', '.join(cls.__dataclass_fields__)}")
        return cls(**d)


def scan_interval(image_size: Sequence[int], window: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Stride between window starts per spatial dim: ``int(window * (1 - overlap))``, at least 1,
    and the whole window when it spans the image (MONAI's ``_get_scan_interval``)."""
    out = []
    for size, w in zip(image_size, window):
        out.append(int(w) if w == size else max(1, int(w * (1 - overlap))))
    return tuple(out)


def window_starts(image_size: Sequence[int], window: Sequence[int], interval: Sequence[int]) -> list[tuple[int, ...]]:
    """Start corner of every window, row-major (first spatial dim slowest); the last window of each dim ends
    exactly at the image edge (MONAI's ``dense_patch_slices``).  ``window`` must not exceed ``image_size``."""
    per_dim = []
    for size, w, step in zip(image_size, window, interval):
        n = 1
        for d in range(int(math.ceil(size / step))):
            if d * step + w >= size:
                n = d + 1
                break
        per_dim.append([i * step - max(i * step + w - size, 0) for i in range(n)])
    return [tuple(int(s) for s in starts) for starts in itertools.product(*per_dim)]


def window_count(image_size: Sequence[int], window: Sequence[int], tiling: Tiling = Tiling()) -> int:
    """How many windows :func:`tiled_predict` runs per image (for progress bars and cost estimates)."""
    padded = [max(s, w) for s, w in zip(image_size, window)]
    return len(window_starts(padded, window, scan_interval(padded, window, tiling.overlap)))


def importance_map(window: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """float32 weights of one window's output: ones ("constant") or a separable Gaussian centred on the window
    ("gaussian", sigma = ``sigma_scale`` * size per dim), clamped below at 1e-3 so edge pixels keep a weight
    (MONAI's ``compute_importance_map``)."""
    if mode not in BLEND_MODES:
        raise ConfigError(f"unknown blending mode '{mode}'", f"valid modes: {', '.join(BLEND_MODES)}")
    if mode == "constant":
        weights = np.ones(tuple(window), np.float32)
    else:
        weights = np.ones((), np.float32)
        for w in window:
            x = np.arange(-(w - 1) / 2.0, (w - 1) / 2.0 + 1, dtype=np.float32)
            sigma = float(w * sigma_scale)
            g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
            weights = np.multiply.outer(weights, g) if weights.ndim else g
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def _pad_widths(image_size: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for size, w in zip(image_size, window):
        diff = max(int(w) - int(size), 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def tiled_predict(
    images: np.ndarray,
    window: Sequence[int],
    predict: Predict,
    tiling: Tiling = Tiling(),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run ``predict`` over ``images`` (N, C, *spatial) in windows of ``window`` and blend: (N, K, *spatial) float32.

    ``predict`` gets float32 (B, C, *window) with B <= ``tiling.batch`` and
    must return (B, K, *window).  ``progress(done, total)`` is called after
    each batch.  A model that is translation-equivariant gives the same output
    tiled and untiled wherever every window covering a pixel sees all of that
    pixel's receptive field (tested).
    """
    x = np.asarray(images)
    window = tuple(int(w) for w in window)
    spatial = x.ndim - 2
    if x.ndim < 3 or spatial != len(window):
        raise ConfigError(f"tiled inference needs (N, C, {', '.join('S' * len(window))}) input for a "
                          f"{len(window)}-D window, got shape {tuple(x.shape)}", "add the batch and channel axes")
    if any(w < 1 for w in window):
        raise ConfigError(f"window {list(window)} must be positive in every dim")
    x = x.astype(np.float32, copy=False)
    image_size = tuple(int(s) for s in x.shape[2:])
    pads = _pad_widths(image_size, window)
    if any(b or a for b, a in pads):
        mode = PADDING_MODES[tiling.padding_mode]
        kw = {"constant_values": tiling.cval} if mode == "constant" else {}
        x = np.pad(x, [(0, 0), (0, 0), *pads], mode=mode, **kw)
    padded = tuple(int(s) for s in x.shape[2:])
    starts = window_starts(padded, window, scan_interval(padded, window, tiling.overlap))
    weights = importance_map(window, tiling.mode, tiling.sigma_scale)
    slices = [tuple(slice(s, s + w) for s, w in zip(st, window)) for st in starts]
    n_images, n_win = x.shape[0], len(slices)
    total = n_images * n_win
    out: np.ndarray | None = None
    for first in range(0, total, tiling.batch):
        idx = range(first, min(first + tiling.batch, total))
        batch = np.ascontiguousarray(np.stack([x[i // n_win][(slice(None), *slices[i % n_win])] for i in idx]))
        y = np.asarray(predict(batch))
        if y.ndim != spatial + 2 or y.shape[0] != len(idx) or tuple(y.shape[2:]) != window:
            raise ConfigError(
                f"the model returned shape {tuple(y.shape)} for a batch of {len(idx)} windows of {list(window)}",
                "tiled inference needs a model whose output has the input's spatial size",
            )
        if out is None:
            out = np.zeros((n_images, y.shape[1], *padded), np.float32)
        y = y.astype(np.float32, copy=False) * weights
        for j, i in enumerate(idx):
            out[i // n_win][(slice(None), *slices[i % n_win])] += y[j]
        if progress is not None:
            progress(idx.stop, total)
    assert out is not None  # at least one window always exists
    count = np.zeros(padded, np.float32)
    for sl in slices:
        count[sl] += weights
    out /= count
    if any(b or a for b, a in pads):
        out = out[(slice(None), slice(None), *(slice(b, b + s) for (b, _), s in zip(pads, image_size)))]
    return np.ascontiguousarray(out)


def runner_predictor(runner: Any) -> tuple[Predict, int]:
    """A :data:`Predict` for a loaded runner (anything with ``run(float32 NCHW) -> float32 NCHW`` and ``inputs``)
    and the batch it runs best at: the artifact's static batch.  Short batches are padded to that batch with
    copies of their last window and the copies' outputs dropped, so a static-batch artifact takes any count."""
    spec = runner.inputs[0] if getattr(runner, "inputs", None) else None
    static = int(spec.shape[0]) if spec is not None and spec.shape and int(spec.shape[0]) > 0 else 1

    def predict(batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        short = (-n) % static
        if short:
            batch = np.concatenate([batch, np.repeat(batch[-1:], short, axis=0)])
        return np.asarray(runner.run(batch))[:n]

    return predict, static
