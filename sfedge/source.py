"""The torch model a build starts from, and what it is (build side: torch).

:class:`ModelSource` is what every backend's ``make`` takes: an eval-mode
``nn.Module`` with contiguous parameters, its static NCHW input shape, its
identity (name, config, weights hash: what manifests and build caches
record) and its preprocessing.  It also computes, once per input set, the
fp32 torch outputs every parity gate compares against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sfedge.checkpoint import Checkpoint
from sfedge.models import input_shape

__all__ = ["ModelSource"]


@dataclass
class ModelSource:
    """The torch model a backend builds from, and what it is (for metadata and caching).

    ``model`` is an eval-mode ``nn.Module`` with contiguous parameters;
    ``input_shape`` is the static NCHW shape the artifact is built for.
    """

    model: nn.Module
    name: str
    config: dict[str, Any]
    weights_sha256: str
    input_shape: tuple[int, int, int, int]
    preprocessing: dict[str, Any] | None = None
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

        Models with a fixed input size (the Factorizer's positional embedding)
        keep their own size; parameters and buffers are made contiguous (the
        TFLite converter bakes non-contiguous constants wrongly, litert-torch#1238).
        """
        model = ckpt.model.eval()
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.contiguous()
        shape = input_shape(ckpt.config, input_size)
        pre = ckpt.preprocessing.as_dict() if ckpt.preprocessing is not None else None
        return cls(model, ckpt.name, dict(ckpt.config), ckpt.weights_sha256, shape, pre)

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.name, "config": self.config, "weights_sha256": self.weights_sha256,
            "input_shape": list(self.input_shape), "preprocessing": self.preprocessing,
        }
