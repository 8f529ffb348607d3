"""A 2D U-Net (milesial layout) whose kxk convs come from the conv factory.

``unet`` and ``unet-sfconv`` are the same factory with ``conv="dense"`` or
``conv="sfconv"``; everything else (widths, depth, channels) is shared config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sfedge.models.registry import register_model
from sfedge.nn.conv import ConvSpec, create_conv2d

__all__ = ["UNet"]


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> BN -> ReLU) x 2; convs have no bias because BN follows."""

    def __init__(self, spec: ConvSpec, cin: int, cout: int) -> None:
        super().__init__(
            create_conv2d(spec, cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            create_conv2d(spec, cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip, DoubleConv."""

    def __init__(self, spec: ConvSpec, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = DoubleConv(spec, 2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net with ``len(widths)`` levels; input H and W must be divisible by 2**(levels-1)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], spec: ConvSpec) -> None:
        super().__init__()
        self.inc = DoubleConv(spec, in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(spec, widths[i], widths[i + 1])) for i in range(len(widths) - 1)
        )
        self.ups = nn.ModuleList(Up(spec, widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.divisor = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)


def _unet(
    *,
    in_channels: int = 3,
    out_channels: int = 1,
    widths: Sequence[int] = (16, 32, 64, 128),
    conv: str = "dense",
    s: float = 0.25,
) -> UNet:
    """2D U-Net for segmentation (logits out; apply a sigmoid for probabilities)."""
    return UNet(in_channels, out_channels, list(widths), ConvSpec(conv, s))


register_model("unet", "2D U-Net, dense 3x3 convs (the vanilla baseline)")(_unet)
register_model("unet-sfconv", "2D U-Net with SFConv2d (1xk -> kx1, rank s*min(Ci,Co))", conv="sfconv")(_unet)
