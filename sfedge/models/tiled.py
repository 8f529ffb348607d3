"""A torch model behind the numpy tiler (build side): whole-image evaluation and the bundles' whole-image reference.

:mod:`sfedge.tiling` is numpy only so it runs on devices; this adapter is the
workstation's way into it.  Training evaluation (held-out Dice of fixed-size
models such as the Factorizer) and the torch reference stored in bundles for
``sfedge verify --whole-image`` both go through it, so the device's tiled
output is compared with exactly what the same tiler does around torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sfedge.tiling import Predict, Tiling, tiled_predict

__all__ = ["torch_predictor", "fixed_window", "tiled_forward"]


def torch_predictor(model: nn.Module) -> Predict:
    """float32 NCHW numpy batch -> the model's float32 outputs, without autograd (the model's mode is left as is)."""

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).float().numpy()

    return predict


def fixed_window(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) a model only accepts (its config's ``input_size``: the Factorizer), or None when any size works."""
    size = (getattr(model, "sfedge_config", None) or {}).get("input_size")
    return (int(size[0]), int(size[1])) if size else None


def tiled_forward(
    model: nn.Module, images: np.ndarray, tiling: Tiling, window: Sequence[int] | None = None
) -> np.ndarray:
    """``model`` over (N, C, H, W) float32 ``images`` in windows of ``window`` (default: the model's fixed input
    size), blended as :func:`sfedge.tiling.tiled_predict` does; the model is put in eval mode and restored."""
    window = tuple(window) if window is not None else fixed_window(model)
    if window is None:
        raise ValueError("tiled_forward needs a window for a model without a fixed input size")
    was = model.training
    model.eval()
    try:
        return tiled_predict(images, window, torch_predictor(model), tiling)
    finally:
        model.train(was)
