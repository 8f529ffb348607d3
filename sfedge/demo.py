"""The demo pair: a small vanilla U-Net and its SFConv (s=0.25) twin, trained on fundus pseudo-labels.

``make demo``, the tests and ``make bench`` all use :func:`demo_checkpoints`,
which trains each model once (a few CPU minutes) and afterwards loads it from
the cache folder.  Which models and how they are trained is fixed here so the
three agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sfedge.train import DEMO_MODELS, TrainConfig, train_or_load

__all__ = ["DEMO_TRAIN", "demo_cache_dir", "demo_checkpoints"]

DEMO_TRAIN = TrainConfig(steps=800, batch=8, crop=128, lr=3e-3)


def demo_cache_dir() -> Path:
    """$SFEDGE_CACHE/demo or <repo>/.cache/demo."""
    root = os.environ.get("SFEDGE_CACHE") or str(Path(__file__).resolve().parent.parent / ".cache")
    return Path(root) / "demo"


def demo_checkpoints(
    folder: str | Path | None = None,
    on_start: Callable[[str], None] | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> dict[str, Path]:
    """Paths of the trained demo checkpoints by model name (training the missing ones)."""
    import torch

    folder = Path(folder) if folder else demo_cache_dir()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = {}
    for name, cfg in DEMO_MODELS.items():
        if on_start:
            on_start(name)
        ckpt, _ = train_or_load(name, cfg, folder, DEMO_TRAIN, (lambda s, loss, n=name: progress(n, s, loss)) if progress else None)
        out[name] = ckpt.path
    return out
