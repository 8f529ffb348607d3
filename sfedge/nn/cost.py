"""Parameter and multiply-accumulate (MAC) counts for any nn.Module.

MACs come from PyTorch's own FLOP counter (``torch.utils.flop_counter``), which
sees every aten op (convs, transposed convs, matmuls inside the NMF layer), so
the count does not depend on which layer types we thought to hook.  One MAC is
two FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "macs_by_module"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _forward_flops(model: nn.Module, input_shape: Sequence[int]) -> FlopCounterMode:
    x = torch.zeros(tuple(input_shape), dtype=torch.float32)
    counter = FlopCounterMode(display=False, depth=None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on an input of ``input_shape`` (N, C, H, W)."""
    return _forward_flops(model, input_shape).get_total_flops() // 2


def macs_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs per module name (dotted, as in ``named_modules``) for one forward pass."""
    counts = _forward_flops(model, input_shape).get_flop_counts()
    out: dict[str, int] = {}
    for key, ops in counts.items():
        # FlopCounterMode keys look like "Global" or "UNet.down1.conv"; drop the root class name.
        name = "" if key == "Global" else key.split(".", 1)[1] if "." in key else ""
        out[name] = sum(ops.values()) // 2
    return out
