"""Rewrite torch patterns litert-torch cannot convert into equivalent ones it can, before conversion.

Each rewrite replaces a module by one that computes the same function (checked
in torch on a sample before conversion; the parity gate checks the result
again) and is built from ops TFLite maps directly:

* ``ConvTranspose2d`` with ``padding`` / ``output_padding`` (MONAI's ``UNet``
  upsamples with kernel 3, stride 2, padding 1, output padding 1): litert-torch
  lowers it to an ``mhlo.convolution`` with ``lhs_dilation`` that it cannot
  legalize.  A transposed conv with padding p and output padding op is the
  unpadded ("VALID") transposed conv cropped by p at the start and p - op at
  the end, and TFLite's TRANSPOSE_CONV does the unpadded one natively.

The model handed in is not changed: the rewrite works on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from sfedge.errors import ExportError

__all__ = ["CroppedConvTranspose2d", "rewrite_for_litert", "rewrite_notes"]


class CroppedConvTranspose2d(nn.Module):
    """``ConvTranspose2d(padding=p, output_padding=op)`` as the unpadded transposed conv, cropped (op <= p)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding=0,
                                       output_padding=0, groups=conv.groups, bias=conv.bias is not None,
                                       dilation=conv.dilation)
        self.conv.weight = conv.weight
        if conv.bias is not None:
            self.conv.bias = conv.bias
        self.crop = (int(conv.padding[0]), int(conv.padding[1]))  # type: ignore[index]
        self.extra = (int(conv.output_padding[0]), int(conv.output_padding[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        (ph, pw), (oh, ow) = self.crop, self.extra
        return y[..., ph : y.shape[-2] - ph + oh, pw : y.shape[-1] - pw + ow]


def _needs_crop(m: nn.Module) -> bool:
    if not isinstance(m, nn.ConvTranspose2d) or isinstance(m.padding, str):
        return False
    pad, extra = tuple(m.padding), tuple(m.output_padding)
    return (any(pad) or any(extra)) and all(e <= p for e, p in zip(extra, pad, strict=True))


def rewrite_notes(model: nn.Module) -> list[str]:
    """What :func:`rewrite_for_litert` will change in ``model``, one note per kind of rewrite (empty: nothing)."""
    n = sum(_needs_crop(m) for m in model.modules())
    if not n:
        return []
    return [f"{n} ConvTranspose2d layer(s) with padding/output_padding rewritten as an unpadded transposed conv "
            "plus a crop before conversion (same function; litert-torch cannot convert the padded form)"]


def rewrite_for_litert(model: nn.Module, input_shape: Sequence[int]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every pattern above rewritten, and one note per kind of rewrite (empty: unchanged).

    The copy is checked against ``model`` on a seeded input of ``input_shape``;
    a mismatch is an ExportError (a rewrite that changes the function is a bug).
    """
    names = [n for n, m in model.named_modules() if _needs_crop(m)]
    if not names:
        return model, []
    out = copy.deepcopy(model).eval()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, CroppedConvTranspose2d(getattr(parent, child)))
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), out(x)
    a = a[0] if isinstance(a, (tuple, list)) else a
    b = b[0] if isinstance(b, (tuple, list)) else b
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max()))):
        raise ExportError(f"rewriting {len(names)} transposed conv(s) for litert-torch changed the model's output",
                          "report this model; build it for onnxruntime meanwhile")
    return out, rewrite_notes(model)
