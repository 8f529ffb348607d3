"""Input preprocessing shared by training, calibration, bundles and the device runtime.

Numpy only, so a device with the runtime-only install can turn an image into
exactly the tensor the model was trained and calibrated on.  The spec is
recorded in checkpoints, calibration hashes and bundle manifests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from sfedge.errors import ConfigError

__all__ = ["Preprocessing", "FUNDUS_PREPROCESSING", "FUNDUS_GREEN_PREPROCESSING"]


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
