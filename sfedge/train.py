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

from sfedge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sfedge.datasets.fundus import FundusDemo, holdout_region, load_fundus, random_crops, task_labels
from sfedge.errors import ConfigError
from sfedge.fileio import sha256_bytes
from sfedge.models import create_model
from sfedge.nn.flatness import flatness_loss
from sfedge.nn.losses import dice_bce_loss, task_loss
from sfedge.parity import mask_dice
from sfedge.preprocess import FUNDUS_GREEN_PREPROCESSING, FUNDUS_PREPROCESSING, Preprocessing

__all__ = [
    "TrainConfig", "TrainResult", "dice_bce_loss", "task_loss", "demo_preprocessing", "train", "holdout_dice",
    "train_or_load", "DEMO_MODELS",
]


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


def demo_preprocessing(in_channels: int) -> Preprocessing:
    """The fundus demo's input for a model taking ``in_channels``: RGB (3) or the green channel (1)."""
    if in_channels == 3:
        return FUNDUS_PREPROCESSING
    if in_channels == 1:
        return FUNDUS_GREEN_PREPROCESSING
    raise ConfigError(f"the fundus demo gives 1 (green) or 3 (RGB) input channels, not {in_channels}",
                      "train this model on your own data")


def _to_tensor(images: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    if pre.channels == 1 and images.shape[-1] == 3:
        images = images[..., 1:2]  # the green channel
    return torch.from_numpy(np.stack([pre.apply(im) for im in images]))


@torch.no_grad()
def holdout_dice(model: nn.Module, demo: FundusDemo | None = None, pre: Preprocessing = FUNDUS_PREPROCESSING,
                 task: str = "binary") -> float:
    """Dice against the pseudo-labels on the held-out strip, for what the output means.

    binary: vessels inside the field of view; multiclass: the mean Dice of the
    classes other than 0 (see :func:`sfedge.datasets.fundus.task_labels`);
    multilabel: the mean Dice of the labels.
    """
    demo = demo or load_fundus()
    divisor = int(getattr(model, "divisor", 16))
    image, vessels, fov = holdout_region(demo, max(divisor, 16))
    was = model.training
    model.eval()
    logits = model(_to_tensor(image[None], pre))[0].numpy()
    model.train(was)
    labels = task_labels(task, logits.shape[0], vessels[None], fov[None])[0]
    if task == "binary":
        pred, truth = (logits[0] > 0) & fov, (labels[0] > 0.5) & fov
        return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))
    if task == "multiclass":
        pred = logits.argmax(0)
        return float(np.mean([mask_dice(pred == c, labels == c) for c in range(1, logits.shape[0])]))
    return float(np.mean([mask_dice(logits[c] > 0, labels[c] > 0.5) for c in range(logits.shape[0])]))


def train(
    model: nn.Module,
    config: TrainConfig = TrainConfig(),
    *,
    demo: FundusDemo | None = None,
    pre: Preprocessing = FUNDUS_PREPROCESSING,
    progress: Callable[[int, float], None] | None = None,
    task: str = "binary",
) -> TrainResult:
    """Train ``model`` in place on fundus crops; returns held-out Dice and the loss curve.

    ``task`` says what the output means; the demo's labels for it come from
    :func:`sfedge.datasets.fundus.task_labels` (vessels, and the field of view
    for 3-class and multilabel models).
    """
    demo = demo or load_fundus()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        images, masks, fovs = random_crops(demo, config.batch, config.crop, rng, "train", with_fov=True)
        x = _to_tensor(images, pre)
        logits = model(x)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        y = torch.from_numpy(task_labels(task, logits.shape[1], masks, fovs))
        loss = task_loss(task, logits, y)
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
    return TrainResult(dice=holdout_dice(model, demo, pre, task), losses=losses, seconds=time.perf_counter() - start, steps=config.steps)


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
