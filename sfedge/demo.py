"""The demo pairs: a small vanilla U-Net and its SFConv (s=0.25) twin, and the same for the Factorizer,
trained on fundus pseudo-labels with one budget.

``make demo``, the tests and ``make bench`` all use :func:`demo_checkpoints`,
which trains each model once (CPU minutes) and afterwards loads it from the
cache folder.  Which models and how they are trained is fixed here so the
three agree.  The Factorizer pair (``family="factorizer"``) gets the U-Nets'
budget: the same steps, batch and 128x128 crops, which is also the
Factorizer's fixed input size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sfedge.errors import UnknownNameError
from sfedge.train import DEMO_FACTORIZERS, DEMO_MODELS, TrainConfig, train_or_load

__all__ = ["DEMO_TRAIN", "DEMO_FAMILIES", "demo_cache_dir", "demo_checkpoints"]

DEMO_TRAIN = TrainConfig(steps=800, batch=8, crop=128, lr=3e-3)
# family -> {model name: config}; the first model of each pair is the vanilla baseline.
DEMO_FAMILIES: dict[str, dict[str, dict]] = {"unet": DEMO_MODELS, "factorizer": DEMO_FACTORIZERS}


def demo_cache_dir() -> Path:
    """$SFEDGE_CACHE/demo or <repo>/.cache/demo."""
    root = os.environ.get("SFEDGE_CACHE") or str(Path(__file__).resolve().parent.parent / ".cache")
    return Path(root) / "demo"


def demo_checkpoints(
    folder: str | Path | None = None,
    on_start: Callable[[str], None] | None = None,
    progress: Callable[[str, int, float], None] | None = None,
    family: str = "unet",
) -> dict[str, Path]:
    """Paths of the trained demo checkpoints of ``family`` ("unet" or "factorizer") by model name, vanilla
    first (training the missing ones)."""
    import torch

    if family not in DEMO_FAMILIES:
        raise UnknownNameError("demo family", family, list(DEMO_FAMILIES))
    folder = Path(folder) if folder else demo_cache_dir()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = {}
    for name, cfg in DEMO_FAMILIES[family].items():
        if on_start:
            on_start(name)
        ckpt, _ = train_or_load(name, cfg, folder, DEMO_TRAIN, (lambda s, loss, n=name: progress(n, s, loss)) if progress else None)
        out[name] = ckpt.path
    return out
