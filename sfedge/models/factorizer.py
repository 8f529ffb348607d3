"""The 2D Factorizer U-Net (arXiv 2202.12295): NMF of local windows instead of attention.

Layout (the paper's local Factorizer, single output head):

* stem: 3x3 conv ``in_channels -> widths[0]``;
* encoder level i > 0: ``k2 s2`` conv down to ``widths[i]``, then ``depth``
  Factorizer blocks; a learned positional embedding is added at the
  bottleneck (last level) only;
* decoder level: ``k2 s2`` transposed conv up, concat the skip, a 1x1
  ``2C -> C`` adapter, then ``depth`` blocks;
* head: 1x1 conv to ``out_channels`` logits.

A block is ``x + Drop(Linear_out(unmat(NMF(ReLU(mat(Linear_in(LN(x))))))))``
followed by ``x + MLP(LN(x))``.  ``mat`` splits channels into heads of
``head_dim`` and space into ``patch x patch`` windows; each (head, window) is a
``head_dim x patch**2`` matrix that the NMF reconstructs as ``U V^T``.

``factorizer`` and ``factorizer-sfconv`` are one factory differing by
``conv``: every kxk conv (stem, down convs) comes from :func:`create_conv2d`.

Export constraints honoured here: every reshape/permute has at most 5 dims
(TensorRT / TFLite transposes), LayerNorm uses ``permute`` (no einsum), no
``.mT``, and the input size is fixed (the positional embedding and window
grid depend on it) and checked with Python ints so tracing still works.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from sfedge.errors import ConfigError
from sfedge.models.registry import register_model
from sfedge.nn.conv import ConvSpec, create_conv2d
from sfedge.nn.nmf import NMF, NMF_METHODS, set_nmf_iterations

__all__ = ["Factorizer", "FactorizerBlock", "NMFMixer", "ChannelLayerNorm", "to_windows", "from_windows"]


def to_windows(x: torch.Tensor, head_dim: int, patch: int, height: int, width: int) -> torch.Tensor:
    """Matricize (B, h*d, H, W) into (B*h*H/p*W/p, d, p*p): one matrix per (head, window).

    Written as three reshapes and two permutes of at most 5 dims (a direct
    ``b (h d) (hb p1) (wb p2)`` split would need 7).  The sizes are Python
    ints given by the caller and the batch is ``-1``, so a traced ONNX graph
    gets constant shapes instead of Shape/Gather arithmetic.
    """
    d, p = head_dim, patch
    hb, wb = height // p, width // p
    x = x.reshape(-1, p, wb, p)  # (B*h*d*hb, p1, wb, p2)
    x = x.permute(0, 2, 1, 3)  # (B*h*d*hb, wb, p1, p2)
    x = x.reshape(-1, d, hb, wb, p * p)  # (B*h, d, hb, wb, p1*p2)
    x = x.permute(0, 2, 3, 1, 4)  # (B*h, hb, wb, d, p1*p2)
    return x.reshape(-1, d, p * p)


def from_windows(m: torch.Tensor, channels: int, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B*h*hb*wb, d, p*p) back to (B, channels, height, width)."""
    d, p = m.shape[-2], patch
    hb, wb = height // p, width // p
    x = m.reshape(-1, hb, wb, d, p * p)  # (B*h, hb, wb, d, p1*p2)
    x = x.permute(0, 3, 1, 2, 4)  # (B*h, d, hb, wb, p1*p2)
    x = x.reshape(-1, wb, p, p)  # (B*h*d*hb, wb, p1, p2)
    x = x.permute(0, 2, 1, 3)  # (B*h*d*hb, p1, wb, p2)
    return x.reshape(-1, channels, height, width)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor via permutes (einsum-free for export)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class NMFMixer(nn.Module):
    """The attention replacement: Linear_in -> ReLU -> windows -> NMF -> unwindow -> Linear_out -> Drop.

    With ``swin=True`` the same NMF also runs on a copy rolled by ``patch//2``
    (rolled back afterwards) and the two reconstructions are averaged, so
    information crosses window borders within one block.
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        *,
        head_dim: int,
        patch: int,
        rank: int,
        iterations: int,
        method: str,
        eps: float,
        swin: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.channels, self.size, self.head_dim, self.patch, self.swin = channels, size, head_dim, patch, swin
        self.in_proj = nn.Conv2d(channels, channels, 1, bias=False)
        self.nmf = NMF(head_dim, patch * patch, rank=rank, iterations=iterations, method=method, eps=eps)
        self.out_proj = nn.Conv2d(channels, channels, 1)
        self.drop = nn.Dropout(dropout)

    def _reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        m = self.nmf(to_windows(z, self.head_dim, self.patch, self.size[0], self.size[1]))
        return from_windows(m, self.channels, self.size[0], self.size[1], self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.in_proj(x))
        y = self._reconstruct(z)
        if self.swin:
            s = self.patch // 2
            shifted = self._reconstruct(torch.roll(z, shifts=(-s, -s), dims=(2, 3)))
            y = 0.5 * (y + torch.roll(shifted, shifts=(s, s), dims=(2, 3)))
        return self.drop(self.out_proj(y))


class FactorizerBlock(nn.Module):
    """Pre-norm residual pair: ``x + NMFMixer(LN(x))`` then ``x + MLP(LN(x))`` (GELU, hidden ratio ``mlp_ratio``)."""

    def __init__(
        self, channels: int, size: tuple[int, int], *, mlp_ratio: float, dropout: float, **nmf: object
    ) -> None:
        super().__init__()
        hidden = int(mlp_ratio * channels)
        self.norm1 = ChannelLayerNorm(channels)
        self.mixer = NMFMixer(channels, size, dropout=dropout, **nmf)  # type: ignore[arg-type]
        self.norm2 = ChannelLayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(hidden, channels, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FactorizerStage(nn.Module):
    """One U-Net level: optional 1x1 adapter (decoder, 2C -> C), optional positional embedding, ``depth`` blocks."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        size: tuple[int, int],
        *,
        depth: int,
        pos_embed: bool,
        **block: object,
    ) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(in_channels, channels, 1, bias=False) if in_channels != channels else nn.Identity()
        # Learned, one vector per bottleneck pixel (std 1 as in the reference code).
        self.pos = nn.Parameter(torch.randn(1, channels, *size)) if pos_embed else None
        self.blocks = nn.Sequential(*(FactorizerBlock(channels, size, **block) for _ in range(depth)))  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        if self.pos is not None:
            x = x + self.pos
        return self.blocks(x)


class Factorizer(nn.Module):
    """2D Factorizer U-Net for a fixed input size; returns (N, out_channels, H, W) logits."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        input_size: tuple[int, int],
        spec: ConvSpec,
        *,
        depth: int = 1,
        pos_embed: bool = True,
        **block: object,
    ) -> None:
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size
        levels = len(widths)
        sizes = [(input_size[0] >> i, input_size[1] >> i) for i in range(levels)]
        self.stem = create_conv2d(spec, in_channels, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(create_conv2d(spec, widths[i - 1], widths[i], 2, stride=2) for i in range(1, levels))
        self.encoder = nn.ModuleList(
            FactorizerStage(
                widths[i], widths[i], sizes[i], depth=depth, pos_embed=pos_embed and i == levels - 1, **block
            )
            for i in range(levels)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels - 1))
        )
        self.decoder = nn.ModuleList(
            FactorizerStage(2 * widths[i], widths[i], sizes[i], depth=depth, pos_embed=False, **block)
            for i in reversed(range(levels - 1))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def set_nmf_iterations(self, k: int) -> int:
        """Set K on every NMF layer (e.g. train with 5, deploy with 2); returns the number of layers."""
        return set_nmf_iterations(self, k)

    def _check_input(self, x: torch.Tensor) -> None:
        with warnings.catch_warnings():
            # The size is fixed by design; while tracing for ONNX the check is
            # evaluated once on the example input, which is what we want.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            shape = tuple(int(s) for s in x.shape)
        if len(shape) != 4 or shape[1] != self.in_channels or shape[2:] != tuple(self.input_size):
            h, w = self.input_size
            raise ConfigError(
                f"factorizer expects input (N, {self.in_channels}, {h}, {w}), got {shape}",
                f"resize inputs to {h}x{w} or build the model with input_size=[H, W] "
                "(the positional embedding and NMF windows fix the size)",
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = self.encoder[0](self.stem(x))
        skips = [y]
        for down, stage in zip(self.downs, self.encoder[1:]):
            y = stage(down(y))
            skips.append(y)
        skips.pop()
        for up, stage in zip(self.ups, self.decoder):
            y = stage(torch.cat([skips.pop(), up(y)], dim=1))
        return self.head(y)


def _pos_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"factorizer {name} must be a positive int, got {value!r}")
    return value


def _factorizer(
    *,
    in_channels: int = 3,
    out_channels: int = 1,
    widths: Sequence[int] = (16, 32, 64, 128),
    input_size: Sequence[int] = (128, 128),
    head_dim: int = 8,
    patch: int = 8,
    rank: int = 1,
    iterations: int = 5,
    method: str = "hals",
    eps: float = 1e-8,
    depth: int = 1,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
    swin: bool = False,
    conv: str = "dense",
    s: float = 0.25,
) -> Factorizer:
    """2D Factorizer U-Net (NMF token mixing in local windows) for segmentation logits."""
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("head_dim", head_dim),
        ("patch", patch),
        ("rank", rank),
        ("iterations", iterations),
        ("depth", depth),
    ):
        _pos_int(name, value)
    widths = [_pos_int("widths entry", w) for w in widths]
    if len(widths) < 2:
        raise ConfigError(f"factorizer needs at least 2 levels, got widths={widths}", "e.g. widths=[16, 32, 64, 128]")
    bad = [w for w in widths if w % head_dim]
    if bad:
        raise ConfigError(f"widths {bad} are not divisible by head_dim={head_dim}", "use multiples of head_dim")
    size = tuple(_pos_int("input_size entry", v) for v in input_size)
    if len(size) != 2:
        raise ConfigError(f"input_size must be [H, W], got {list(input_size)}")
    divisor = 2 ** (len(widths) - 1) * patch
    if size[0] % divisor or size[1] % divisor:
        raise ConfigError(
            f"input_size {list(size)} is not divisible by 2**(levels-1) * patch = {divisor}",
            f"use multiples of {divisor}, fewer levels or a smaller patch",
        )
    if method not in NMF_METHODS:
        raise ConfigError(f"unknown NMF method '{method}'", f"valid methods: {', '.join(NMF_METHODS)}")
    if rank > min(head_dim, patch * patch):
        raise ConfigError(f"rank {rank} exceeds min(head_dim, patch**2) = {min(head_dim, patch * patch)}")
    if swin and patch % 2:
        raise ConfigError(f"swin=True needs an even patch, got {patch}", "use e.g. patch=8")
    if not mlp_ratio > 0 or not eps > 0 or not 0 <= dropout < 1:
        raise ConfigError(f"need mlp_ratio > 0, eps > 0 and 0 <= dropout < 1, got {mlp_ratio}, {eps}, {dropout}")
    return Factorizer(
        in_channels,
        out_channels,
        widths,
        (size[0], size[1]),
        ConvSpec(conv, s),
        depth=depth,
        head_dim=head_dim,
        patch=patch,
        rank=rank,
        iterations=iterations,
        method=method,
        eps=float(eps),
        swin=bool(swin),
        mlp_ratio=float(mlp_ratio),
        dropout=float(dropout),
    )


register_model("factorizer", "2D Factorizer U-Net (rank-1 HALS NMF in 8x8 windows), dense kxk convs")(_factorizer)
register_model(
    "factorizer-sfconv", "2D Factorizer U-Net whose stem/down convs are SFConv2d (rank s*min(Ci,Co))", conv="sfconv"
)(_factorizer)
