"""The reference backend: the torch model itself, from an sfedge checkpoint.

It has no ``make`` (the checkpoint *is* the artifact); its runner lets the
profiler time the fp32 torch model beside the deployment artifacts.  It is
the one runner that imports torch and sfedge's model code, by nature: it is
a workstation tool, not a device runtime, and the import contracts in
pyproject.toml name it as the exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner
from sfedge.checkpoint import load_checkpoint
from sfedge.models import input_shape

__all__ = ["TorchRunner"]


class TorchRunner(Runner):
    """Runs an sfedge checkpoint (.safetensors) in torch on the CPU."""

    backend = "pytorch"

    def _load(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        ckpt = load_checkpoint(self.path)
        self.model = ckpt.model.eval()
        shape = list(self.options.get("input_shape") or input_shape(ckpt.config))
        self.inputs = [TensorSpec("input", list(shape), "float32", "NCHW")]
        with torch.no_grad():
            out = self.model(torch.zeros(shape))
        self.outputs = [TensorSpec("output", list(out.shape), "float32", "NCHW")]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            y = self.model(torch.from_numpy(feed[self.inputs[0].name]))
        return {self.outputs[0].name: y.numpy()}

    def _close(self) -> None:
        self.model = None

    def versions(self) -> dict[str, Any]:
        return {"torch": torch.__version__}

