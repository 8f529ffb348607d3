"""The torch model a build starts from, and what it is (build side: torch).

:func:`resolve_model` turns whatever a user names into a loaded model: an
sfedge checkpoint, a registry name, ``file.py:factory`` or
``package.module:factory`` with ``config`` and ``weights``, or a
``torch.export`` program (see :mod:`sfedge.models.specs`).

:class:`ModelSource` is what every backend's ``make`` takes: an eval-mode
``nn.Module`` with contiguous parameters, its static NCHW input shape, its
identity (name, config, weights hash, source: what manifests and build caches
record), what its output means (the task) and its preprocessing.  It also
computes, once per input set, the fp32 torch outputs every parity gate
compares against.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfedge.checkpoint import Checkpoint, load_checkpoint, load_weights, read_checkpoint_header
from sfedge.errors import ConfigError
from sfedge.models import input_shape
from sfedge.models.specs import build_from_spec, load_exported, parse_spec, weights_sha256
from sfedge.parity import TASKS, detect_task

__all__ = ["ModelSource", "resolve_model", "FirstOutput"]


class FirstOutput(nn.Module):
    """A model whose forward returns several outputs (deep-supervision heads), cut to the first: the prediction."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def resolve_model(
    spec: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    task: str | None = None,
) -> Checkpoint:
    """The model ``spec`` names, loaded: a checkpoint path, a ``.pt2`` program, a registry name or a factory spec.

    ``config`` (the factory's keyword arguments) and ``weights`` (a state_dict
    file) apply to registry names and factory specs; a checkpoint carries its
    own.  Without weights the model is untrained, which its metrics say.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task '{task}'", f"valid tasks: {', '.join(TASKS)}")
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix == ".safetensors":
        if config or weights:
            raise ConfigError(f"{path} is a checkpoint: it carries its own config and weights",
                              "drop --config / --weights, or give the model's spec instead of the checkpoint")
        read_checkpoint_header(path)  # a plain state_dict gets the hint to pass it as --weights
        ckpt = load_checkpoint(path)
        if task is not None:
            ckpt.task = task
        return ckpt
    parsed = parse_spec(text)
    if parsed.kind == "exported":
        if config or weights:
            raise ConfigError(f"{text} is a torch.export program: it carries its own weights and arguments",
                              "drop --config / --weights")
        model, shape, digest = load_exported(text)
        return Checkpoint(model=model, name=model.sfedge_name, config={}, weights_sha256=digest,
                          source=model.sfedge_source, task=task, input_shape=shape,  # type: ignore[arg-type]
                          metrics={"exported_program": True})
    model = build_from_spec(text, config).eval()
    if weights is not None:
        digest = load_weights(model, weights)
        metrics: dict[str, Any] = {"weights_file": Path(weights).name}
    else:
        digest = weights_sha256(model.state_dict())
        metrics = {"untrained": True}
    return Checkpoint(model=model, name=model.sfedge_name, config=dict(model.sfedge_config),  # type: ignore[arg-type]
                      weights_sha256=digest, metrics=metrics, source=getattr(model, "sfedge_source", None), task=task)


@dataclass
class ModelSource:
    """The torch model a backend builds from, and what it is (for metadata and caching).

    ``model`` is an eval-mode ``nn.Module`` with contiguous parameters and one
    tensor output; ``input_shape`` is the static NCHW shape the artifact is
    built for; ``task`` says what the output means (sfedge.parity.TASKS).
    """

    model: nn.Module
    name: str
    config: dict[str, Any]
    weights_sha256: str
    input_shape: tuple[int, int, int, int]
    preprocessing: dict[str, Any] | None = None
    task: str = "binary"
    source: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    _reference: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """fp32 torch outputs for ``x`` (N, C, H, W), computed one sample at a time and cached by content."""
        key = hash(x.tobytes())
        if key not in self._reference:
            with torch.no_grad():
                outs = [self.model(torch.from_numpy(np.ascontiguousarray(x[i : i + 1]))).numpy() for i in range(len(x))]
            self._reference[key] = np.concatenate(outs)
        return self._reference[key]

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, input_size: Sequence[int]) -> ModelSource:
        """Source for a loaded checkpoint at the target's ``input_size`` (H, W).

        Models with a fixed input size (the Factorizer's positional embedding,
        an exported program) keep their own size; parameters and buffers are
        made contiguous (the TFLite converter bakes non-contiguous constants
        wrongly, litert-torch#1238); a model returning several outputs (deep
        supervision) is cut to its first, the prediction; the task is the
        checkpoint's, or detected from the output's channels.
        """
        model = ckpt.model.eval()
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.contiguous()
        shape = ckpt.input_shape or input_shape(ckpt.config, input_size, model)
        notes: list[str] = []
        try:
            with torch.no_grad():
                out = model(torch.zeros(shape))
        except Exception as e:  # the user's forward: say which input it was given
            raise ConfigError(f"{ckpt.name} fails on an input of shape {list(shape)}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}",
                              "check its input channels (--config in_channels) and the target's input_size") from e
        if isinstance(out, (tuple, list)):
            model = FirstOutput(model).eval()
            out = out[0]
            notes.append("the model returns several outputs (deep supervision); its first output is the prediction "
                         "and the only one deployed")
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise ConfigError(f"{ckpt.name} returns {type(out).__name__} of shape {getattr(out, 'shape', '?')}, "
                              "not an (N, C, H, W) map", "sfedge deploys 2D segmentation / dense-prediction models")
        task = ckpt.task or detect_task(tuple(out.shape))
        if ckpt.task is None:
            notes.append(f"task '{task}' detected from {out.shape[1]} output channel(s); pass --task to change it")
        pre = ckpt.preprocessing.as_dict() if ckpt.preprocessing is not None else None
        return cls(model, ckpt.name, dict(ckpt.config), ckpt.weights_sha256, tuple(shape), pre, task,  # type: ignore[arg-type]
                   ckpt.source, notes)

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.name, "config": self.config, "weights_sha256": self.weights_sha256,
            "input_shape": list(self.input_shape), "preprocessing": self.preprocessing, "task": self.task,
            "source": self.source,
        }

