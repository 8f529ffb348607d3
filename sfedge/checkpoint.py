"""Checkpoints that rebuild their model alone: weights + where the model comes from + its factorization.

A checkpoint is one safetensors file.  Its header metadata holds the format
tag, the model's name and complete config, its *source* (a registry name, or
the ``file.py:factory`` / ``package.module:factory`` spec it was built from,
with the file's hash or the package's version), the ranks of every SFConv2d
layer that the source does not build itself (a user model factorized with
``sfedge factorize``), the task its output means, the input preprocessing,
free-form metrics and the sha256 of the weights.  Loading rebuilds the model
from the source, factorizes it to the recorded ranks and loads the weights,
refusing weights that do not match the hash or the architecture.

safetensors stores tensors contiguous, which the TFLite path needs
(litert-torch#1238: non-contiguous constants convert wrongly), and holds no
code: loading a checkpoint imports only the model code its source names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfedge.errors import CheckpointError
from sfedge.fileio import atomic_path
from sfedge.models import create_model
from sfedge.models.specs import build_from_spec, weights_sha256
from sfedge.nn import factorize, factorized_ranks
from sfedge.parity import TASKS
from sfedge.preprocess import Preprocessing

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_weights", "read_checkpoint_header",
           "weights_sha256", "FORMAT"]

FORMAT = "sfedge-checkpoint/1"


@dataclass
class Checkpoint:
    """A loaded model and what is known about it (from a checkpoint file, or built from a spec)."""

    model: nn.Module
    name: str
    config: dict
    weights_sha256: str
    preprocessing: Preprocessing | None = None
    metrics: dict = field(default_factory=dict)
    path: Path | None = None
    source: dict | None = None  # where the model code comes from (None: sfedge's registry)
    task: str | None = None  # what the output means (sfedge.parity.TASKS); None: detect from the output shape
    factorized: dict[str, int] = field(default_factory=dict)  # SFConv2d ranks the source does not build itself
    input_shape: tuple[int, int, int, int] | None = None  # fixed by the model itself (a torch.export program)


def _rebuild(name: str, config: dict, source: dict | None) -> nn.Module:
    """The model as its source builds it (before any recorded factorization)."""
    if source is None or source.get("kind") in (None, "registry", "entry_point"):
        return create_model(name, **config)
    if source.get("kind") in ("file", "module"):
        return build_from_spec(source["spec"], config)
    raise CheckpointError(f"cannot rebuild a model from a '{source.get('kind')}' source",
                          "checkpoints hold registry, file and module models; build .pt2 programs directly")


def _extra_factorization(model: nn.Module, name: str, config: dict, source: dict | None) -> dict[str, int]:
    """SFConv2d layers of ``model`` (name: rank) that its source does not build, checked against what it does."""
    built = factorized_ranks(_rebuild(name, config, source))
    now = factorized_ranks(model)
    changed = {n: r for n, r in now.items() if built.get(n) != r}
    lost = sorted(set(built) - set(now))
    if lost:
        raise CheckpointError(f"model '{name}' lacks SFConv2d layers its config builds ({', '.join(lost[:3])})",
                              "save a model built by create_model / the spec with the same config")
    return changed


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    preprocessing: Preprocessing | None = None,
    metrics: dict | None = None,
    task: str | None = None,
    record_factorization: bool = False,
) -> str:
    """Write ``model`` to ``path`` atomically; returns the weights sha256.

    ``model`` must carry its identity (``sfedge_name`` and ``sfedge_config``,
    set by ``create_model`` and by building from a spec).  A model
    factorized in place (``sfedge.nn.factorize``) is saved only with
    ``record_factorization=True`` (what ``sfedge factorize`` does): otherwise
    its name and config would describe the dense model, and the file could not
    be loaded.
    """
    from safetensors.torch import save_file

    name = getattr(model, "sfedge_name", None)
    config = getattr(model, "sfedge_config", None)
    if name is None or config is None:
        raise CheckpointError(
            "this model was not built by sfedge (create_model, or a model spec), so it cannot be rebuilt from a file",
            "build it with sfedge.models.create_model(name, **config) or "
            "sfedge.models.specs.build_from_spec('file.py:factory', config)",
        )
    if task is not None and task not in TASKS:
        raise CheckpointError(f"unknown task '{task}'", f"valid tasks: {', '.join(TASKS)}")
    source = getattr(model, "sfedge_source", None)
    recorded = dict(getattr(model, "sfedge_factorized", {}) or {})
    extra = _extra_factorization(model, name, config, source)
    unrecorded = {n: r for n, r in extra.items() if recorded.get(n) != r}
    if unrecorded and not record_factorization:
        raise CheckpointError(
            f"model '{name}' was factorized in place ({len(unrecorded)} SFConv2d layer(s) its config does not build), "
            "so saving it under its dense name would write a checkpoint that cannot be loaded",
            "use `sfedge factorize` or sfedge.build.factorize_checkpoint(...), or pass record_factorization=True",
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
        "source": json.dumps(source),
        "factorized": json.dumps(extra),
        "task": json.dumps(task),
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
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({e})",
                              "re-create it with sfedge train or factorize; a .pt/.pth file of weights goes with "
                              "--weights beside the model's spec") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sfedge checkpoint (format={meta.get('format')!r})",
                              "a plain safetensors state_dict goes with --weights beside the model's spec")
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild the model from its source, apply its recorded factorization and load its weights (hash and shapes checked)."""
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
        source = json.loads(meta.get("source") or "null")
        ranks = json.loads(meta.get("factorized") or "{}")
        task = json.loads(meta.get("task") or "null")
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has a damaged header ({e})", "re-create it") from e
    model = _rebuild(meta["model"], config, source)
    if ranks:
        factorize(model, ranks=ranks)
        model.sfedge_factorized = dict(ranks)  # type: ignore[assignment]
    _load_state(model, state, f"checkpoint {path} does not match its config for model '{meta['model']}'",
                "the config JSON and the weights come from different models; re-save the checkpoint")
    model.eval()
    pre = json.loads(meta.get("preprocessing") or "null")
    return Checkpoint(
        model=model, name=meta["model"], config=config, weights_sha256=digest,
        preprocessing=Preprocessing.from_dict(pre) if pre else None,
        metrics=json.loads(meta.get("metrics") or "{}"), path=path, source=source, task=task, factorized=ranks,
    )


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, hint: str) -> None:
    """``load_state_dict(strict=True)``; ``what`` (the one-line error) gets the first missing / unexpected / mismatched key."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{what}: {lines[1] if len(lines) > 1 else lines[0]}"[:300], hint) from e


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """Load a state_dict file (``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors``) into ``model``; its sha256.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors
    only, never pickled code.  A dict that wraps the state_dict under
    ``state_dict`` or ``model`` (Lightning, many training scripts) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist", "give the .pt/.pth/.safetensors file of the model's state_dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})", "check the file") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors for files that need code, zip errors for damaged ones
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} cannot be read as a weights-only state_dict ({first[:160]})",
                "save the weights with torch.save(model.state_dict(), path); sfedge never unpickles code",
            ) from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (name -> tensor)",
                              "save it with torch.save(model.state_dict(), path)")
    _load_state(model, state, f"weights file {path} does not match the model",
                "check --config: the weights come from a model built with other arguments")
    return weights_sha256(state)
