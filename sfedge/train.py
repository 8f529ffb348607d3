"""A short fine-tuning loop: Dice + BCE loss plus the singular-value flattening term.

This is the demo's trainer (CPU minutes, fundus pseudo-labels), not a research
training pipeline: Adam with a one-cycle schedule on random crops with flips,
and held-out Dice on the right part of the photograph.  It is also what turns
the demo models into *trained* models, which the parity tests need (untrained
models give near-constant outputs that hide conversion bugs).

With a ``teacher`` the same loop distils instead: the loss is the distance
between the model's outputs and the teacher's on the same crops
(:func:`distill_loss`), so no labels are needed and any images will do (a
calibration set's samples, ``images=``).  ``sfedge plan`` fine-tunes planned
and uniformly factorized models this way from their dense original.
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
from sfedge.datasets.fundus import FundusDemo, holdout_region, load_fundus, random_crops, task_labels
from sfedge.errors import ConfigError
from sfedge.fileio import sha256_bytes
from sfedge.models import create_model
from sfedge.models.tiled import fixed_window, tiled_forward
from sfedge.nn.flatness import flatness_loss
from sfedge.nn.losses import dice_bce_loss, task_loss
from sfedge.parity import mask_dice
from sfedge.preprocess import FUNDUS_GREEN_PREPROCESSING, FUNDUS_PREPROCESSING, Preprocessing
from sfedge.tiling import Tiling

__all__ = [
    "TrainConfig", "TrainResult", "dice_bce_loss", "task_loss", "distill_loss", "demo_preprocessing", "train",
    "holdout_dice", "train_or_load", "save_evaluated", "DEMO_MODELS", "DEMO_FACTORIZERS", "EVAL_TILING",
]

# How fixed-size models (the Factorizer) are run over the held-out strip: Gaussian blending with half-window
# overlap, so window borders (where the positional embedding and the NMF window grid see cut context) weigh little.
EVAL_TILING = Tiling(overlap=0.5, mode="gaussian", sigma_scale=0.125, batch=8)


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
    """What a run achieved: held-out Dice (None when not evaluated on the demo labels), loss curve and wall time."""

    dice: float | None
    losses: list[float]
    seconds: float
    steps: int


def distill_loss(task: str, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How far the model's outputs are from the teacher's, for what the output means.

    binary / multilabel: cross-entropy against the teacher's sigmoid (soft
    targets; its minimum is the teacher's output, and unlike MSE on logits it
    does not spend the model on logits far from the decision threshold);
    multiclass: KL(teacher || model) of the class softmax per pixel;
    regression: mean squared error.
    """
    if task in ("binary", "multilabel"):
        return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher))
    if task == "multiclass":
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none")
        return kl.sum(1).mean()
    if task == "regression":
        return F.mse_loss(logits, teacher)
    raise ConfigError(f"no distillation objective for a {task} output", "valid tasks: binary, multiclass, multilabel, regression")


def _image_batch(images: np.ndarray, batch: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch`` random crops (with flips) of preprocessed NCHW ``images``: the distillation batches."""
    n, _, h, w = images.shape
    ch, cw = min(crop, h), min(crop, w)
    out = []
    for _ in range(batch):
        i = int(rng.integers(n))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        im = images[i, :, y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            im = im[:, :, ::-1]
        if rng.random() < 0.5:
            im = im[:, ::-1]
        out.append(np.ascontiguousarray(im))
    return torch.from_numpy(np.stack(out).astype(np.float32))


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
def holdout_dice(
    model: nn.Module, demo: FundusDemo | None = None, pre: Preprocessing = FUNDUS_PREPROCESSING,
    task: str = "binary", tiling: Tiling = EVAL_TILING,
) -> float:
    """Dice against the pseudo-labels on the held-out strip, for what the output means.

    binary: vessels inside the field of view; multiclass: the mean Dice of the
    classes other than 0 (see :func:`sfedge.datasets.fundus.task_labels`);
    multilabel: the mean Dice of the labels.  Models that take any size see
    the whole strip at once; models with a fixed input size (the Factorizer)
    are run over it in windows of that size with ``tiling``
    (:mod:`sfedge.tiling`), as a device would.
    """
    demo = demo or load_fundus()
    divisor = int(getattr(model, "divisor", 16))
    image, vessels, fov = holdout_region(demo, max(divisor, 16))
    x = _to_tensor(image[None], pre)
    was = model.training
    model.eval()
    try:
        if fixed_window(model) is not None:
            logits = tiled_forward(model, x.numpy(), tiling)[0]
        else:
            logits = model(x)[0].numpy()
    finally:
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
    teacher: nn.Module | None = None,
    images: np.ndarray | None = None,
    evaluate: bool = True,
) -> TrainResult:
    """Train ``model`` in place on fundus crops; returns held-out Dice (unless ``evaluate`` is False) and the loss curve.

    ``task`` says what the output means; the demo's labels for it come from
    :func:`sfedge.datasets.fundus.task_labels` (vessels, and the field of view
    for 3-class and multilabel models).  With ``teacher`` the loss is
    :func:`distill_loss` to the teacher's outputs instead (no labels), on
    random crops of ``images`` (preprocessed float32 NCHW, e.g. a calibration
    set's samples) or, without them, of the fundus photograph.  ``evaluate``:
    held-out Dice on the fundus pseudo-labels at the end (meaningless for a
    model of other images: pass False, and ``dice`` is None).  Callers that
    must not lose a long run to a failing evaluation pass ``evaluate=False``,
    save, then call :func:`holdout_dice` themselves (:func:`save_evaluated`).
    Models with a fixed input size train on crops of that size.
    """
    if images is not None and teacher is None:
        raise ConfigError("images without labels can only train by distillation", "pass a teacher model too")
    demo = demo or (load_fundus() if images is None or evaluate else None)
    crop = fixed_window(model) or config.crop
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    if teacher is not None:
        teacher.eval()
    for step in range(config.steps):
        if images is not None:
            x = _image_batch(images, config.batch, crop, rng)
        else:
            crops, masks, fovs = random_crops(demo, config.batch, crop, rng, "train", with_fov=True)
            x = _to_tensor(crops, pre)
        logits = model(x)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
                target = target[0] if isinstance(target, (tuple, list)) else target
            loss = distill_loss(task, logits, target)
        else:
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
    seconds = time.perf_counter() - start
    dice = holdout_dice(model, demo, pre, task) if evaluate else None
    return TrainResult(dice=dice, losses=losses, seconds=seconds, steps=config.steps)


# The demo pair: same U-Net, dense vs SFConv (s=0.25).
DEMO_MODELS: dict[str, dict] = {
    "unet": {"widths": [16, 32, 64, 128]},
    "unet-sfconv": {"widths": [16, 32, 64, 128], "s": 0.25},
}
# The Factorizer pair (`sfedge demo --family factorizer`): the registry defaults (16-32-64-128, 128x128 input,
# rank-1 HALS, K=5, 8x8 windows), dense vs SFConv (s=0.25) stem and down convs.
DEMO_FACTORIZERS: dict[str, dict] = {
    "factorizer": {"widths": [16, 32, 64, 128]},
    "factorizer-sfconv": {"widths": [16, 32, 64, 128], "s": 0.25},
}


def save_evaluated(
    model: nn.Module,
    path: str | Path,
    metrics: dict,
    *,
    pre: Preprocessing = FUNDUS_PREPROCESSING,
    demo: FundusDemo | None = None,
    task: str = "binary",
    record_factorization: bool = False,
) -> tuple[float | None, str | None]:
    """Save the trained ``model``, evaluate its held-out Dice, and save again with the Dice in its metrics.

    The first save comes before any evaluation, so a failing evaluation (a model the evaluation cannot run,
    a missing dataset) never loses the training run; both saves are atomic.  Returns (Dice, None), or
    (None, one-line reason) when the evaluation failed, in which case the checkpoint carries
    ``holdout_dice: null`` and the reason.
    """
    save = dict(preprocessing=pre, task=task, record_factorization=record_factorization)
    save_checkpoint(model, path, metrics={**metrics, "holdout_dice": None}, **save)
    try:
        dice: float | None = holdout_dice(model, demo, pre, task)
        error = None
    except Exception as e:  # any failure of the evaluation is reported, never fatal: the weights are saved
        dice, error = None, f"{type(e).__name__}: {e}".splitlines()[0]
    save_checkpoint(model, path, metrics={**metrics, "holdout_dice": dice, **({"evaluation_error": error} if error else {})},
                    **save)
    return dice, error


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
    result = train(model, config, progress=progress, evaluate=False)
    save_evaluated(model, path, {"train_seconds": round(result.seconds, 1), "steps": result.steps,
                                 "train_config": asdict(config), "labels": "Frangi pseudo-labels on skimage.data.retina()"})
    return load_checkpoint(path)
