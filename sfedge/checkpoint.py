"""Checkpoints that rebuild their model by name: weights + config JSON + hash.

A checkpoint is one safetensors file.  Its header metadata holds the format
tag, the registry name, the complete model config, the input preprocessing,
free-form metrics and the sha256 of the weights; loading rebuilds the model
with ``create_model(name, **config)`` and refuses weights that do not match the
hash or the architecture.  safetensors stores tensors contiguous, which the
TFLite path needs (litert-torch#1238: non-contiguous constants convert wrongly).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sfedge.errors import CheckpointError
from sfedge.fileio import atomic_path
from sfedge.models import create_model
from sfedge.preprocess import Preprocessing

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "weights_sha256", "FORMAT"]

FORMAT = "sfedge-checkpoint/1"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model and what the file says about it."""

    model: nn.Module
    name: str
    config: dict
    weights_sha256: str
    preprocessing: Preprocessing | None = None
    metrics: dict = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    preprocessing: Preprocessing | None = None,
    metrics: dict | None = None,
) -> str:
    """Write ``model`` (built by ``create_model``) to ``path`` atomically; returns the weights sha256."""
    from safetensors.torch import save_file

    name = getattr(model, "sfedge_name", None)
    config = getattr(model, "sfedge_config", None)
    if name is None or config is None:
        raise CheckpointError(
            "this model was not built by sfedge.models.create_model, so it cannot be rebuilt by name",
            "build it with create_model(name, **config)",
        )
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    digest = weights_sha256(state)
    meta = {
        "format": FORMAT,
        "model": name,
        "config": json.dumps(config, sort_keys=True),
        "weights_sha256": digest,
        "preprocessing": json.dumps(preprocessing.as_dict() if preprocessing else None),
        "metrics": json.dumps(metrics or {}),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return digest


def read_checkpoint_header(path: str | os.PathLike[str]) -> dict:
    """The metadata of a checkpoint file without loading tensors (raises CheckpointError if unreadable)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", "give the path of a .safetensors file written by sfedge")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged headers
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({e})", "re-create it with sfedge train or factorize") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sfedge checkpoint (format={meta.get('format')!r})", f"expected format {FORMAT}")
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild the model by name and config and load its weights, checking the hash and shapes."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_checkpoint_header(path)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}", "re-create it with sfedge train or factorize") from e
    digest = weights_sha256(state)
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its weights do not match the sha256 in its header",
            "re-create it with sfedge train or factorize",
        )
    try:
        config = json.loads(meta["config"])
        model = create_model(meta["model"], **config)
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has a damaged config ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(
            f"checkpoint {path} does not match its config for model '{meta['model']}': {first}",
            "the config JSON and the weights come from different models; re-save the checkpoint",
        ) from e
    model.eval()
    pre = json.loads(meta.get("preprocessing") or "null")
    return Checkpoint(
        model=model,
        name=meta["model"],
        config=config,
        weights_sha256=digest,
        preprocessing=Preprocessing.from_dict(pre) if pre else None,
        metrics=json.loads(meta.get("metrics") or "{}"),
        path=path,
    )
