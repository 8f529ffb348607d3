"""Small nets for tests/test_own_model.py, written the way users write them (loaded by file spec in subprocesses)."""

from __future__ import annotations

import torch
from torch import nn


def upsampler() -> nn.Module:
    """InstanceNorm, PReLU, GroupNorm, LeakyReLU, a padded transposed conv (output_padding 1), nearest upsampling."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.InstanceNorm2d(8, affine=True), nn.PReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 1, 3, padding=1),
    )


def loud_net() -> nn.Module:
    """A net with large logits (tens), seeded: fp32 rounding shows above 1e-4 absolute, far below it relatively."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 1, 3, padding=1))
    with torch.no_grad():
        net[-1].weight.mul_(60.0)
    return net.eval()
