"""The one conv factory every sfedge model is built with (timm's create_conv2d idea).

A model never names ``nn.Conv2d`` or ``SFConv2d`` directly for its kxk convs;
it calls :func:`create_conv2d` with a :class:`ConvSpec`.  Vanilla and SFConv
variants of a model therefore differ by one argument (``conv="sfconv"``), not
by a copied model file.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sfedge.errors import ConfigError
from sfedge.nn.sfconv import SFConv2d

__all__ = ["ConvSpec", "create_conv2d", "CONV_KINDS"]

CONV_KINDS = ("dense", "sfconv")


@dataclass(frozen=True)
class ConvSpec:
    """Which conv a model uses for its spatial (kxk) convolutions.

    ``kind``: "dense" (nn.Conv2d) or "sfconv" (SFConv2d with rank ratio ``s``).
    1x1 convs are always dense: factorizing them saves nothing spatial.
    """

    kind: str = "dense"
    s: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in CONV_KINDS:
            raise ConfigError(f"unknown conv kind '{self.kind}'", f"valid conv kinds: {', '.join(CONV_KINDS)}")
        if not self.s > 0:
            raise ConfigError(f"rank ratio s must be > 0, got {self.s}", "use e.g. 1, 0.5, 0.25 or 0.125")


def create_conv2d(
    spec: ConvSpec,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
) -> nn.Module:
    """Build a conv layer of the kind ``spec`` asks for (1x1 kernels stay dense)."""
    if spec.kind == "sfconv" and kernel_size > 1:
        return SFConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, s=spec.s)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
