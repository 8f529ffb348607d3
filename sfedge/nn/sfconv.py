"""SFConv2d: a kxk convolution factorized into a 1xk conv to rank r, then a kx1 conv.

The factorization follows Khodak et al. (ICLR 2021) as used by the SFConv paper
(arXiv 2403.00606): the dense weight ``W`` of shape (Co, Ci, kh, kw) is permuted
to (Co, kh, Ci, kw) *before* it is reshaped to the (Co*kh) x (Ci*kw) matrix
``W_mat = P @ Q``.  With that permutation ``Q`` becomes a 1xkw convolution from
Ci to r channels and ``P`` a khx1 convolution from r to Co channels, and the
pair computes exactly the dense convolution with weight ``P @ Q``:

* conv A (``Q``): kernel (1, kw), stride (1, sw), padding (0, pw), no bias;
* conv B (``P``): kernel (kh, 1), stride (sh, 1), padding (ph, 0), the bias.

Cost per output pixel drops from Co*Ci*kh*kw to r*(Ci*kw + Co*kh) multiply-adds
(roughly; conv A runs at the input height).  The rank is ``r = max(1,
round(s * min(Ci, Co)))``; the permuted matrix can reach rank
min(Co*kh, Ci*kw) = k*min(Ci, Co) for square kernels, so ``s = 1`` is already a
compression.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sfedge.errors import LayerError

__all__ = ["SFConv2d", "rank_for"]


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise LayerError(f"{what} must be an int or a pair, got {v!r}", "use e.g. 3 or (3, 3)")
    return t  # type: ignore[return-value]


def rank_for(s: float, in_channels: int, out_channels: int) -> int:
    """The SFConv rank rule ``max(1, round(s * min(Ci, Co)))`` (round half up).

    Half-up rounding (not Python's banker's rounding) so that e.g. s=0.5 with 5
    channels gives 3, as a reader of the paper would compute by hand.
    """
    if not (s > 0):
        raise LayerError(f"rank ratio s must be > 0, got {s}", "use a value such as 1, 0.5 or 0.25")
    return max(1, int(math.floor(s * min(in_channels, out_channels) + 0.5)))


class SFConv2d(nn.Module):
    """Factorized 2D convolution (1xk to rank r, then kx1), exactly foldable to one kxk conv.

    Give the rank either as the ratio ``s`` (the paper's rule) or explicitly as
    ``rank``.  Grouped convs, 1x1 kernels and non-zero padding modes are
    rejected because the factorization cannot represent them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        s: float | None = None,
        rank: int | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size")
        sh, sw = _pair(stride, "stride")
        dh, dw = _pair(dilation, "dilation")
        if groups != 1:
            raise LayerError(
                f"SFConv2d cannot factorize a grouped conv (groups={groups})",
                "skip this layer (factorize(..., skip=[name])) or use groups=1",
            )
        if kh == 1 and kw == 1:
            raise LayerError(
                "SFConv2d cannot factorize a 1x1 conv (there is no spatial kernel to split)",
                "keep 1x1 convs dense; factorize() skips them automatically",
            )
        if padding_mode != "zeros":
            raise LayerError(
                f"SFConv2d supports only zero padding, got padding_mode='{padding_mode}'",
                "use padding_mode='zeros' or skip this layer",
            )
        if isinstance(padding, str):
            if padding == "valid":
                ph = pw = 0
            elif padding == "same" and sh == sw == 1 and (dh * (kh - 1)) % 2 == 0 and (dw * (kw - 1)) % 2 == 0:
                ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
            else:
                raise LayerError(
                    f"SFConv2d cannot represent padding='{padding}' with kernel {(kh, kw)} and stride {(sh, sw)}",
                    "give explicit integer padding",
                )
        else:
            ph, pw = _pair(padding, "padding")
        if (s is None) == (rank is None):
            raise LayerError("give exactly one of s (rank ratio) or rank", "e.g. SFConv2d(..., s=0.25)")
        r = rank_for(s, in_channels, out_channels) if rank is None else int(rank)
        max_rank = min(out_channels * kh, in_channels * kw)
        if not 1 <= r <= max_rank:
            raise LayerError(
                f"rank {r} is outside 1..{max_rank} for a {out_channels}x{in_channels}x{kh}x{kw} conv",
                f"choose a rank between 1 and {max_rank}",
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (kh, kw), (sh, sw), (ph, pw), (dh, dw)
        self.rank = r
        self.s = s
        self.conv_a = nn.Conv2d(in_channels, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=False)
        self.conv_b = nn.Conv2d(r, out_channels, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=bias)

    # -- the factors as matrices (for the regularizer and for folding) --------
    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv_b.bias

    def factor_p(self) -> torch.Tensor:
        """P as a (Co*kh) x r matrix (rows ordered (o, a) like the permuted weight)."""
        w = self.conv_b.weight  # (Co, r, kh, 1)
        return w[..., 0].permute(0, 2, 1).reshape(self.out_channels * self.kernel_size[0], self.rank)

    def factor_q(self) -> torch.Tensor:
        """Q as an r x (Ci*kw) matrix (columns ordered (i, b) like the permuted weight)."""
        return self.conv_a.weight.reshape(self.rank, self.in_channels * self.kernel_size[1])

    def dense_weight(self) -> torch.Tensor:
        """The (Co, Ci, kh, kw) weight of the one dense conv this layer computes."""
        kh, kw = self.kernel_size
        w = self.factor_p() @ self.factor_q()
        return w.reshape(self.out_channels, kh, self.in_channels, kw).permute(0, 2, 1, 3).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x))

    # -- conversions ---------------------------------------------------------
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, s: float | None = None, rank: int | None = None) -> SFConv2d:
        """Initialise from a dense conv by truncated SVD (the best rank-r approximation).

        The SVD factors are split evenly (P = U sqrt(S), Q = sqrt(S) V^T) and
        stored contiguous: litert-torch bakes non-contiguous constants in storage
        order and silently produces wrong numbers (google-ai-edge/litert-torch#1238).
        """
        if not isinstance(conv, nn.Conv2d):
            raise LayerError(f"from_dense needs an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            s=s,
            rank=rank,
            padding_mode=conv.padding_mode,
        )
        w = conv.weight.detach()
        co, ci, kh, kw = w.shape
        mat = w.permute(0, 2, 1, 3).reshape(co * kh, ci * kw).double()
        u, sv, vh = torch.linalg.svd(mat, full_matrices=False)
        r = layer.rank
        root = sv[:r].sqrt()
        p = (u[:, :r] * root).float()  # (Co*kh, r)
        q = (root[:, None] * vh[:r]).float()  # (r, Ci*kw)
        with torch.no_grad():
            layer.conv_a.weight.copy_(q.reshape(r, ci, 1, kw).contiguous())
            layer.conv_b.weight.copy_(p.reshape(co, kh, r).permute(0, 2, 1).unsqueeze(-1).contiguous())
            if conv.bias is not None:
                layer.conv_b.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        return layer.to(device=w.device, dtype=w.dtype)

    def to_dense(self) -> nn.Conv2d:
        """Fold P @ Q back into one exact kxk conv (same stride, padding, dilation, bias)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.conv_b.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.conv_b.bias is not None:
                conv.bias.copy_(self.conv_b.bias)  # type: ignore[union-attr]
        return conv.to(device=self.conv_b.weight.device, dtype=self.conv_b.weight.dtype)

    # -- accounting ----------------------------------------------------------
    def macs_per_output_pixel(self) -> int:
        """Multiply-adds per output pixel of the factorized pair (conv A counted at its own grid)."""
        kh, kw = self.kernel_size
        return self.rank * self.in_channels * kw * self.stride[0] + self.out_channels * self.rank * kh

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, rank={self.rank}" + (f", s={self.s}" if self.s is not None else "")
        )

