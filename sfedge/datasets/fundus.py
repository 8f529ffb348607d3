"""Demo segmentation data from scikit-image's real colour fundus photograph.

``skimage.data.retina()`` is a real 1411x1411 fundus photograph.  Its vessel
masks here are **pseudo-labels**: a Frangi vesselness filter on the contrast-
enhanced green channel, thresholded inside the field of view.  They are good
enough to train and compare small models on a CPU in minutes; they are *not*
clinical ground truth, and Dice figures against them say how well a model
reproduces the filter, nothing more.

Split: columns left of ``TRAIN_FRACTION`` of the width are for training, the
rest is held out for Dice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "FundusDemo", "load_fundus", "load_fundus_image", "random_crops", "holdout_region", "task_labels", "TRAIN_FRACTION",
    "DEMO_SCALE", "DEMO_TASK_CHANNELS",
]

# Which label maps the demo data gives each task, by number of output channels (see task_labels).
DEMO_TASK_CHANNELS = {"binary": (1,), "multiclass": (2, 3), "multilabel": (2,)}

TRAIN_FRACTION = 0.7
DEMO_SCALE = 0.5  # the demo works on the photograph at half resolution (706 x 706)


@dataclass(frozen=True)
class FundusDemo:
    """The photograph (uint8 HxWx3), its pseudo-label vessel mask and field-of-view mask at one scale."""

    image: np.ndarray
    vessels: np.ndarray  # bool, Frangi pseudo-labels
    fov: np.ndarray  # bool, inside the circular field of view
    scale: float

    @property
    def split_column(self) -> int:
        """First column of the held-out region."""
        return int(round(self.image.shape[1] * TRAIN_FRACTION))


def _scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    return int(round(shape[0] * scale)), int(round(shape[1] * scale))


@lru_cache(maxsize=4)
def load_fundus_image(scale: float = DEMO_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """The retina photograph (uint8 HxWx3) and its field-of-view mask, resized by ``scale`` (cached per process).

    Calibration sets need only this; the pseudo-labels (:func:`load_fundus`) cost seconds of filtering.
    """
    from skimage import data, transform

    img = data.retina()
    fov = img[..., 0] > 20
    if scale != 1.0:
        shape = _scaled_shape(img.shape, scale)
        img = (transform.resize(img, shape, order=1, anti_aliasing=True) * 255).round().astype(np.uint8)
        fov = transform.resize(fov.astype(np.float32), shape, order=0) > 0.5
    return img, fov


@lru_cache(maxsize=4)
def load_fundus(scale: float = DEMO_SCALE) -> FundusDemo:
    """The retina photograph with Frangi pseudo-labels, resized by ``scale`` (cached per process)."""
    from skimage import data, exposure, filters, morphology, transform

    full = data.retina()
    fov = full[..., 0] > 20
    green = exposure.equalize_adapthist(full[..., 1].astype(np.float64) / 255.0)
    ves = filters.frangi(green, sigmas=range(1, 6), black_ridges=True)
    inner = morphology.erosion(fov, morphology.disk(10))
    ves[~inner] = 0
    lab = ves > np.percentile(ves[fov], 90)
    lab = morphology.remove_small_objects(lab, max_size=100)
    if scale != 1.0:
        lab = transform.resize(lab.astype(np.float32), _scaled_shape(full.shape, scale), order=1, anti_aliasing=True) > 0.5
    img, fov = load_fundus_image(scale)
    return FundusDemo(image=img, vessels=lab, fov=fov, scale=scale)


def random_crops(
    demo: FundusDemo, count: int, size: int | tuple[int, int], rng: np.random.Generator, region: str = "train",
    flips: bool = True, with_fov: bool = False,
) -> tuple[np.ndarray, ...]:
    """``count`` random (image, mask) crops of ``size`` (square, or (H, W) for fixed-size models) from the train
    or held-out region.

    Crops are centred inside the field of view so few are all background.
    Returns uint8 images (N, ch, cw, 3) and float32 masks (N, ch, cw), and with
    ``with_fov`` the field-of-view crops (N, ch, cw) as well.
    """
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = demo.vessels.shape
    x0, x1 = (0, demo.split_column) if region == "train" else (demo.split_column, w)
    if x1 - x0 < cw or h < ch:
        raise ValueError(f"region {region} ({x1 - x0}x{h}) is smaller than the crop size {ch}x{cw}")
    imgs, masks, fovs = [], [], []
    while len(imgs) < count:
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(x0, x1 - cw + 1))
        if demo.fov[y + ch // 2, x + cw // 2] == 0:
            continue
        im = demo.image[y : y + ch, x : x + cw]
        m = demo.vessels[y : y + ch, x : x + cw]
        f = demo.fov[y : y + ch, x : x + cw]
        if flips:
            if rng.random() < 0.5:
                im, m, f = im[:, ::-1], m[:, ::-1], f[:, ::-1]
            if rng.random() < 0.5:
                im, m, f = im[::-1], m[::-1], f[::-1]
        imgs.append(np.ascontiguousarray(im))
        masks.append(np.ascontiguousarray(m, dtype=np.float32))
        fovs.append(np.ascontiguousarray(f))
    if with_fov:
        return np.stack(imgs), np.stack(masks), np.stack(fovs)
    return np.stack(imgs), np.stack(masks)


def task_labels(task: str, channels: int, vessels: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The demo's labels for a model whose output means ``task`` with ``channels`` channels.

    * binary (1 channel): vessels -> float32 (N, 1, H, W);
    * multiclass, 2 classes: background, vessel; 3 classes: outside the
      field of view, retina, vessel -> int64 class map (N, H, W);
    * multilabel, 2 labels: vessel, field of view -> float32 (N, 2, H, W).

    ``vessels`` and ``fov`` are (N, H, W) masks.  Other combinations have no
    labels in the demo data (a regression output, 4+ classes): ValueError.
    """
    v, f = np.asarray(vessels) > 0.5, np.asarray(fov) > 0.5
    if task == "binary" and channels == 1:
        return v[:, None].astype(np.float32)
    if task == "multiclass" and channels in (2, 3):
        labels = v.astype(np.int64) if channels == 2 else np.where(v, 2, np.where(f, 1, 0)).astype(np.int64)
        return labels
    if task == "multilabel" and channels == 2:
        return np.stack([v, f], axis=1).astype(np.float32)
    valid = "; ".join(f"{t}: {', '.join(map(str, c))} channel(s)" for t, c in DEMO_TASK_CHANNELS.items())
    raise ValueError(f"the fundus demo has no labels for a {task} output with {channels} channel(s) ({valid})")


def holdout_region(demo: FundusDemo, multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole held-out strip (image, vessels, fov), cropped to a multiple of ``multiple`` in H and W."""
    h, w = demo.vessels.shape
    x0 = demo.split_column
    hh = (h // multiple) * multiple
    ww = ((w - x0) // multiple) * multiple
    sl = (slice(0, hh), slice(x0, x0 + ww))
    return demo.image[sl], demo.vessels[sl], demo.fov[sl]
