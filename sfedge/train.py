"""A short fine-tuning loop: Dice + BCE loss plus the singular-value flattening term.

This is the demo's trainer (CPU minutes, fundus pseudo-labels), not a research
training pipeline: Adam with a one-cycle schedule on random crops with flips,
and held-out Dice on the right part of the photograph.  It is also what turns
the demo models into *trained* models, which the parity tests need (untrained
models give near-constant outputs that hide conversion bugs).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sfedge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sfedge.datasets.fundus import FundusDemo, holdout_region, load_fundus, random_crops
from sfedge.fileio import sha256_bytes
from sfedge.models import create_model
from sfedge.nn.flatness import flatness_loss
from sfedge.preprocess import FUNDUS_PREPROCESSING, Preprocessing

__all__ = ["TrainConfig", "TrainResult", "dice_bce_loss", "train", "holdout_dice", "train_or_load", "DEMO_MODELS"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (its hash keys the demo cache)."""

    steps: int = 600
    batch: int = 8
    crop: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-5
    flatness_weight: float = 1e-3
    flatness_mode: str = "spectral"
    seed: int = 0

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class TrainResult:
    """What a run achieved: held-out Dice, loss curve and wall time."""

    dice: float
    losses: list[float]
    seconds: float
    steps: int


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss + binary cross-entropy on logits (the usual vessel-segmentation objective)."""
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    dice = (2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def _to_tensor(images: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    return torch.from_numpy(np.stack([pre.apply(im) for im in images]))


@torch.no_grad()
def holdout_dice(model: nn.Module, demo: FundusDemo | None = None, pre: Preprocessing = FUNDUS_PREPROCESSING) -> float:
    """Dice of thresholded predictions against the pseudo-labels on the held-out strip (inside the FOV)."""
    demo = demo or load_fundus()
    divisor = int(getattr(model, "divisor", 16))
    image, vessels, fov = holdout_region(demo, max(divisor, 16))
    was = model.training
    model.eval()
    logits = model(_to_tensor(image[None], pre))[0, 0].numpy()
    model.train(was)
    pred = (logits > 0) & fov
    truth = vessels & fov
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


def train(
    model: nn.Module,
    config: TrainConfig = TrainConfig(),
    *,
    demo: FundusDemo | None = None,
    pre: Preprocessing = FUNDUS_PREPROCESSING,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on fundus crops; returns held-out Dice and the loss curve."""
    demo = demo or load_fundus()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        images, masks = random_crops(demo, config.batch, config.crop, rng, "train")
        x = _to_tensor(images, pre)
        y = torch.from_numpy(masks)[:, None]
        loss = dice_bce_loss(model(x), y)
        if config.flatness_weight > 0:
            loss = loss + flatness_loss(model, config.flatness_weight, config.flatness_mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    for p in model.parameters():  # keep storage contiguous for the TFLite path (litert-torch#1238)
        p.data = p.data.contiguous()
    return TrainResult(dice=holdout_dice(model, demo, pre), losses=losses, seconds=time.perf_counter() - start, steps=config.steps)


# The demo pair: same U-Net, dense vs SFConv (s=0.25).
DEMO_MODELS: dict[str, dict] = {
    "unet": {"widths": [16, 32, 64, 128]},
    "unet-sfconv": {"widths": [16, 32, 64, 128], "s": 0.25},
}


def train_or_load(
    name: str,
    model_config: dict,
    folder: str | Path,
    config: TrainConfig = TrainConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Checkpoint, bool]:
    """Load the checkpoint for (name, config, train config) from ``folder`` or train and save it.

    Returns the checkpoint and whether it was trained now.  The file name carries
    a hash of everything that determines the run, so a changed recipe retrains.
    """
    key = sha256_bytes(json.dumps({"name": name, "model": model_config, "train": config.key()}, sort_keys=True).encode())[:12]
    path = Path(folder) / f"{name}-{key}.safetensors"
    if path.exists():
        return load_checkpoint(path), False
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_suffix(".lock")):  # another process may be training the same model now
        if path.exists():
            return load_checkpoint(path), False
        return _train_and_save(name, model_config, path, config, progress), True


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    import fcntl

    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_and_save(
    name: str, model_config: dict, path: Path, config: TrainConfig, progress: Callable[[int, float], None] | None
) -> Checkpoint:
    torch.manual_seed(config.seed)
    model = create_model(name, **model_config)
    result = train(model, config, progress=progress)
    save_checkpoint(
        model,
        path,
        preprocessing=FUNDUS_PREPROCESSING,
        metrics={"holdout_dice": result.dice, "train_seconds": round(result.seconds, 1), "steps": result.steps,
                 "train_config": asdict(config), "labels": "Frangi pseudo-labels on skimage.data.retina()"},
    )
    return load_checkpoint(path)
