"""Training objectives by task (what the output means): shared by the demo trainer and quantization-aware fine-tuning."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sfedge.errors import ConfigError

__all__ = ["dice_bce_loss", "task_loss"]


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss + binary cross-entropy on logits (the usual vessel-segmentation objective)."""
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    dice = (2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def task_loss(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training objective for what the output means: Dice + BCE per channel (binary, multilabel), or
    soft Dice over classes + cross-entropy (multiclass; ``target`` is the class map)."""
    if task in ("binary", "multilabel"):
        return dice_bce_loss(logits, target)
    if task == "multiclass":
        prob = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
        inter = (prob * onehot).sum((0, 2, 3))
        dice = (2 * inter + 1.0) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1.0)
        return (1 - dice).mean() + F.cross_entropy(logits, target)
    raise ConfigError(f"the demo trainer has no objective for a {task} output", "train it with your own code")
