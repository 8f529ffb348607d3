"""Input preprocessing shared by training, calibration, bundles and the device runtime.

Numpy only, so a device with the runtime-only install can turn an image into
exactly the tensor the model was trained and calibrated on.  The spec is
recorded in checkpoints, calibration hashes and bundle manifests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from sfedge.errors import ConfigError

__all__ = ["Preprocessing", "FUNDUS_PREPROCESSING", "FUNDUS_GREEN_PREPROCESSING", "int8_pixel_map", "pixels_to_int8",
           "int8_pixel_map_text"]


@dataclass(frozen=True)
class Preprocessing:
    """uint8/float image (H, W, C) -> float32 (C, H, W): scale to [0, 1], then (x - mean) / std per channel."""

    channels: int = 3
    mean: tuple[float, ...] = field(default=(0.0, 0.0, 0.0))
    std: tuple[float, ...] = field(default=(1.0, 1.0, 1.0))

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocessing channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"preprocessing mean/std need {self.channels} values each, got {len(self.mean)} and {len(self.std)}",
                "give one mean and one std per channel",
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError("preprocessing std values must be > 0")

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) or (H, W) image, uint8 in 0..255 or float in 0..1 -> normalised float32 (C, H, W)."""
        x = np.asarray(image)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        elif x.dtype == np.uint16:
            x = x.astype(np.float32) / 65535.0
        else:
            x = x.astype(np.float32)
        if x.ndim == 2:
            x = x[..., None]
        x = np.moveaxis(x, -1, 0)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return ((x - mean) / std).astype(np.float32)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            return cls(channels=int(d["channels"]), mean=tuple(map(float, d["mean"])), std=tuple(map(float, d["std"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad preprocessing spec {d!r}: {e}", "give channels, mean and std") from e


# Per-channel statistics of skimage.data.retina() (whole image, 0..1 scale), rounded.
FUNDUS_PREPROCESSING = Preprocessing(channels=3, mean=(0.625, 0.249, 0.181), std=(0.348, 0.153, 0.110))
# The green channel alone (1-channel models on the fundus demo; calibration/fundus-demo-green.toml).
FUNDUS_GREEN_PREPROCESSING = Preprocessing(channels=1, mean=(0.249,), std=(0.153,))


def int8_pixel_map(pre: Preprocessing, scale: float, zero_point: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (a, b) with ``q = clip(round(a[c] * p + b[c]), -128, 127)`` for a uint8 pixel ``p``.

    Why: a full-integer artifact takes int8; a camera gives uint8.  The
    model's preprocessing ((p / 255 - mean) / std) and the input's
    quantization (real = scale * (q - zero_point)) fold into one affine map
    per channel, so an app converts camera bytes with one multiply-add (or a
    256-entry table per channel) and never forms the float image.
    """
    mean = np.asarray(pre.mean, np.float64)
    std = np.asarray(pre.std, np.float64)
    a = 1.0 / (255.0 * std * scale)
    b = zero_point - mean / (std * scale)
    return a, b


def pixels_to_int8(image: np.ndarray, pre: Preprocessing, scale: float, zero_point: int) -> np.ndarray:
    """uint8 pixels (H, W, C) -> the int8 input tensor (C, H, W) of a full-integer artifact (see :func:`int8_pixel_map`)."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ConfigError(f"pixels_to_int8 takes uint8 pixels, got {x.dtype}", "pass the camera's 8-bit image")
    if x.ndim == 2:
        x = x[..., None]
    a, b = int8_pixel_map(pre, scale, zero_point)
    q = np.round(np.moveaxis(x, -1, 0).astype(np.float64) * a[:, None, None] + b[:, None, None])
    return np.clip(q, -128, 127).astype(np.int8)


def int8_pixel_map_text(pre: Preprocessing, scale: float, zero_point: int) -> str:
    """The map of :func:`int8_pixel_map` as one line a bundle README and ``sfedge inspect`` print."""
    a, b = int8_pixel_map(pre, scale, zero_point)
    per = ", ".join(f"c{c}: a={a[c]:.6g}, b={b[c]:.6g}" for c in range(len(a)))
    return (f"uint8 pixel p -> int8 q = clip(round(a[c] * p + b[c]), -128, 127) with {per} "
            f"(= round(((p / 255 - mean[c]) / std[c]) / {scale:.6g}) + {zero_point})")
