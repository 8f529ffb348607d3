"""SFConv2d: exact folding, SVD initialisation, rank rule, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfedge.errors import LayerError
from sfedge.nn import SFConv2d, rank_for


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
def test_sfconv_equals_its_dense_fold(stride: int, padding: int, kernel: int) -> None:
    torch.manual_seed(stride * 10 + padding + kernel)
    layer = SFConv2d(6, 10, kernel, stride=stride, padding=padding, s=0.5)
    nn.init.normal_(layer.conv_b.bias)
    x = torch.randn(2, 6, 19, 23)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.kernel_size == (kernel, kernel)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)


def test_fold_handles_rectangular_kernels_and_dilation() -> None:
    torch.manual_seed(0)
    layer = SFConv2d(4, 7, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1), rank=5)
    x = torch.randn(1, 4, 21, 17)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_from_dense_at_full_rank_reproduces_the_conv(stride: int) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 8, 3, stride=stride, padding=1)
    full = 3 * min(5, 8)  # the permuted (Co*k) x (Ci*k) matrix has rank k*min(Ci, Co)
    layer = SFConv2d.from_dense(conv, rank=full)
    x = torch.randn(2, 5, 16, 16)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=0)


def test_approximation_error_falls_as_rank_grows() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 12, 12)
    ref = conv(x)
    with torch.no_grad():
        errors = [float((SFConv2d.from_dense(conv, rank=r)(x) - ref).norm()) for r in (1, 4, 8, 16, 32, 48)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * errors[0]


def test_from_dense_is_the_best_rank_r_approximation() -> None:
    # Eckart-Young: the Frobenius error of the folded weight equals the norm of the dropped singular values.
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 9, 3)
    w = conv.weight.detach().permute(0, 2, 1, 3).reshape(27, 18)
    sv = torch.linalg.svdvals(w.double())
    for r in (2, 5, 9):
        folded = SFConv2d.from_dense(conv, rank=r).dense_weight()
        err = float((folded - conv.weight).detach().double().norm())
        assert err == pytest.approx(float(sv[r:].norm()), rel=1e-4)


def test_rank_rule_and_bias_placement() -> None:
    assert rank_for(0.25, 16, 32) == 4
    assert rank_for(0.25, 3, 16) == 1  # max(1, round(0.75))
    assert rank_for(0.5, 5, 5) == 3  # half-up, not banker's rounding
    assert rank_for(0.01, 8, 8) == 1
    layer = SFConv2d(8, 16, 3, padding=1, s=0.5)
    assert layer.rank == 4
    assert layer.conv_a.bias is None and layer.conv_b.bias is not None
    assert layer.conv_a.kernel_size == (1, 3) and layer.conv_b.kernel_size == (3, 1)


def test_from_dense_weights_are_contiguous() -> None:
    # litert-torch bakes non-contiguous constants in storage order (litert-torch#1238); SVD factors are column-major.
    layer = SFConv2d.from_dense(nn.Conv2d(8, 8, 3), s=0.5)
    assert all(p.is_contiguous() for p in layer.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(groups=2), "grouped"),
        (dict(kernel_size=1), "1x1"),
        (dict(padding_mode="reflect"), "zero padding"),
        (dict(rank=100), "outside"),
        (dict(s=None), "exactly one"),
    ],
)
def test_unrepresentable_convs_are_rejected(kwargs: dict, match: str) -> None:
    args = dict(in_channels=4, out_channels=4, kernel_size=3, s=0.5)
    if "rank" in kwargs:
        args.pop("s")
    args.update(kwargs)
    with pytest.raises(LayerError, match=match):
        SFConv2d(**args)
