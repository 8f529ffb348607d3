"""Camera-like augmentations of preprocessed samples: scale, exposure, contrast, blur, noise.

Why: INT8 ranges and QAT weights fitted on crops of one photograph at one
scale and exposure generalize poorly (the int8 artifacts agreed only
0.89-0.98 with torch on inputs at another scale or exposure).  A calibration
spec's ``[augment]`` table gives the bounds of what a camera would produce;
:func:`augment_samples` draws from them.  They widen the calibration split
(and the QAT data), and make the *shifted* held-out split the parity gate
also checks (augmented held-out samples, never used to calibrate).

Samples are normalized (C, H, W) float32; each is mapped back to pixels in
[0, 1] with the spec's mean and std, changed, clipped, rounded to 8 bits (a
camera's output) and normalized again.  Numpy and scikit-image only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sfedge.errors import CalibrationError
from sfedge.preprocess import Preprocessing

__all__ = ["Augment", "AUGMENT_KEYS", "DEFAULT_AUGMENT", "augment_samples", "parse_augment"]

RANGE_KEYS = ("scale", "exposure", "contrast", "blur", "noise")
AUGMENT_KEYS = (*RANGE_KEYS, "copies", "shifted", "seed")


@dataclass(frozen=True)
class Augment:
    """Bounds of each augmentation (drawn uniformly per sample) and how many samples to make.

    ``scale``: zoom factor (> 1 zooms in, < 1 zooms out with reflected
    borders); ``exposure``: pixel gain; ``contrast``: gain around each
    channel's mean; ``blur``: Gaussian sigma in pixels; ``noise``: Gaussian
    noise std as a fraction of full scale.  ``copies``: augmented copies of
    each calibration sample added to the calibration split; ``shifted``:
    samples in the shifted held-out split (0: none).
    """

    scale: tuple[float, float] = (0.75, 1.33)
    exposure: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.75, 1.3)
    blur: tuple[float, float] = (0.0, 1.0)
    noise: tuple[float, float] = (0.0, 0.02)
    copies: int = 1
    shifted: int = 16
    seed: int = 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in RANGE_KEYS:
            d[k] = list(d[k])
        return d


DEFAULT_AUGMENT = Augment()
_LIMITS = {"scale": (0.25, 4.0), "exposure": (0.1, 10.0), "contrast": (0.1, 10.0), "blur": (0.0, 10.0),
           "noise": (0.0, 0.5)}


def parse_augment(table: Any, where: str) -> Augment:
    """An ``[augment]`` table -> :class:`Augment`, each key checked (one-line errors naming ``where``)."""
    if not isinstance(table, dict):
        raise CalibrationError(f"{where}: [augment] must be a table", "e.g. [augment] exposure = [0.7, 1.4]")
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k not in AUGMENT_KEYS:
            raise CalibrationError(f"{where}: unknown key 'augment.{k}'", f"valid keys: {', '.join(AUGMENT_KEYS)}")
        if k in RANGE_KEYS:
            lo_lim, hi_lim = _LIMITS[k]
            if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                   for x in v)
                    or not lo_lim <= v[0] <= v[1] <= hi_lim):
                raise CalibrationError(f"{where}: bad value {v!r} for 'augment.{k}'",
                                       f"give [low, high] with {lo_lim:g} <= low <= high <= {hi_lim:g}")
            out[k] = (float(v[0]), float(v[1]))
        else:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1000:
                raise CalibrationError(f"{where}: bad value {v!r} for 'augment.{k}'", "give an integer from 0 to 1000")
            out[k] = v
    return Augment(**out)


def augment_samples(samples: np.ndarray, pre: Preprocessing, aug: Augment, count: int, seed: int) -> np.ndarray:
    """``count`` augmented samples drawn from ``samples`` (N, C, H, W) in turn, with ``seed``; float32."""
    if count <= 0 or len(samples) == 0:
        return np.zeros((0, *samples.shape[1:]), np.float32)
    rng = np.random.default_rng(seed)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    out = []
    for i in range(count):
        pix = samples[i % len(samples)] * std + mean
        pix = _one(pix, aug, rng)
        out.append(((pix - mean) / std).astype(np.float32))
    return np.stack(out)


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])


def _one(pix: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    from skimage.transform import resize

    c, h, w = pix.shape
    s = _draw(rng, aug.scale)
    if s > 1.0:  # zoom in: a random window, resized up
        ch, cw = max(1, round(h / s)), max(1, round(w / s))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        pix = resize(pix[:, y : y + ch, x : x + cw], (c, h, w), order=1, anti_aliasing=False, preserve_range=True)
    elif s < 1.0:  # zoom out: shrink, then reflect the borders back to size
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        small = resize(pix, (c, sh, sw), order=1, anti_aliasing=True, preserve_range=True)
        y, x = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
        pix = np.pad(small, ((0, 0), (y, h - sh - y), (x, w - sw - x)), mode="reflect" if min(sh, sw) > 1 else "edge")
    pix = pix * _draw(rng, aug.exposure)
    m = pix.mean(axis=(1, 2), keepdims=True)
    pix = (pix - m) * _draw(rng, aug.contrast) + m
    sigma = _draw(rng, aug.blur)
    if sigma > 0.05:
        pix = gaussian_filter(pix, sigma=(0, sigma, sigma), mode="reflect")
    noise = _draw(rng, aug.noise)
    if noise > 0:
        pix = pix + rng.normal(0.0, noise, pix.shape)
    return np.round(np.clip(pix, 0.0, 1.0) * 255.0) / 255.0  # what an 8-bit camera delivers
