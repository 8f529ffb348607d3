"""Read input images and write masks on the device: Pillow for PNG/JPEG/TIFF/BMP, numpy for NPY.

Part of the runtime-only install (``sfedge[runtime]`` brings Pillow; no torch,
no scikit-image), so ``sfedge predict`` reads what a device app would hand it.
Every failure is an :class:`~sfedge.errors.ImageError` that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sfedge.errors import BackendUnavailable, ImageError
from sfedge.fileio import atomic_path

__all__ = ["IMAGE_SUFFIXES", "read_image", "fit_channels", "resize", "write_png", "write_npy"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise BackendUnavailable("Pillow is not installed, so PNG/JPEG/TIFF images cannot be read or written here",
                                 "pip install 'sfedge[runtime]' (or pillow); NPY images work without it") from None
    return Image


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """The image at ``path`` as an (H, W, C) array in its own dtype (uint8, uint16 or float for NPY).

    Palette and 1-bit images are expanded to RGB / grey; nothing is resized or normalised here.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image {p} does not exist", "check the path")
    if not p.is_file():
        raise ImageError(f"{p} is not a file", "give image files (PNG, JPEG, TIFF, BMP or NPY), not folders")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read image {p}: {str(e).splitlines()[0]}", "give a numpy .npy array (H, W[, C])") from None
    else:
        image_mod = _pil()
        try:
            with image_mod.open(p) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode == "1":
                    im = im.convert("L")
                arr = np.asarray(im)
        except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as e:
            raise ImageError(f"cannot read image {p}: {str(e).splitlines()[0]}",
                             "give a PNG, JPEG, TIFF, BMP or NPY image") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"image {p} has shape {tuple(arr.shape)}", "images must be (H, W) or (H, W, C)")
    if arr.dtype.kind not in "uif" or arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return arr


def fit_channels(image: np.ndarray, channels: int, path: str | os.PathLike[str]) -> np.ndarray:
    """``image`` (H, W, C) with the model's channel count; an opaque alpha channel is dropped, anything else
    that does not match is an ImageError naming ``path``."""
    c = image.shape[-1]
    if c == channels:
        return image
    if c == channels + 1 and channels in (1, 3):
        alpha = image[..., -1]
        full = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 1.0
        if np.all(alpha == full):
            return np.ascontiguousarray(image[..., :channels])
    kind = {1: "greyscale", 3: "RGB"}.get(channels, f"{channels}-channel")
    raise ImageError(f"image {path} has {c} channel(s) but the model takes {channels}",
                     f"convert it to {kind} first (e.g. Pillow's Image.convert('{'L' if channels == 1 else 'RGB'}'))")


def resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W, C) ``image`` to ``hw``, channel by channel in float32 (Pillow mode F);
    integer images are rounded back to their dtype."""
    image_mod = _pil()
    h, w = int(hw[0]), int(hw[1])
    chans = []
    for c in range(image.shape[-1]):
        im = image_mod.fromarray(np.ascontiguousarray(image[..., c], np.float32))  # mode F
        chans.append(np.asarray(im.resize((w, h), image_mod.Resampling.BILINEAR), np.float32))
    out = np.stack(chans, axis=-1)
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        return np.clip(np.round(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype)


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    image_mod = _pil()
    with atomic_path(path) as tmp:
        image_mod.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return Path(path)


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as .npy, atomically (through a file handle: ``np.save`` would append .npy to the temp name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)
