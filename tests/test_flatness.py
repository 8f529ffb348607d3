"""The flattening regularizer: KL direction, both readings, and that optimising it flattens every layer."""

from __future__ import annotations

import math

import pytest
import torch

from sfedge.errors import ConfigError
from sfedge.models import create_model
from sfedge.nn import flatness_loss, flatness_report, kl_to_uniform
from sfedge.nn.flatness import layer_flatness_loss


def test_kl_to_uniform_is_zero_for_uniform_and_log_n_for_one_hot() -> None:
    assert float(kl_to_uniform(torch.full((8,), 1 / 8))) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_uniform(torch.tensor([1.0, 0, 0, 0]))) == pytest.approx(math.log(4), rel=1e-6)
    p = torch.softmax(torch.randn(10), 0)
    # KL(p || U) in PyTorch's argument order: kl_div(log q, p) with q uniform.
    ref = torch.nn.functional.kl_div(torch.full((10,), -math.log(10)), p, reduction="sum")
    assert float(kl_to_uniform(p)) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("mode", ["spectral", "literal"])
def test_optimising_the_regularizer_lowers_every_layers_kl(mode: str) -> None:
    torch.manual_seed(0)
    model = create_model("unet-sfconv", widths=[8, 16], s=0.5)
    layers = [m for m in model.modules() if m.__class__.__name__ == "SFConv2d"]
    before = [float(layer_flatness_loss(m, mode).detach()) for m in layers]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        flatness_loss(model, weight=1.0, mode=mode).backward()
        opt.step()
    after = [float(layer_flatness_loss(m, mode).detach()) for m in layers]
    assert all(a < b for a, b in zip(after, before)), list(zip(before, after))


def test_report_gives_kl_and_effective_rank_per_layer() -> None:
    model = create_model("unet-sfconv", widths=[8, 16], s=0.5)
    rows = flatness_report(model)
    assert len(rows) == sum(1 for m in model.modules() if m.__class__.__name__ == "SFConv2d")
    for r in rows:
        assert r.kl >= 0 and 1 <= r.effective_rank <= r.rank + 1e-6
        assert math.isclose(r.effective_rank, r.rank * math.exp(-r.kl), rel_tol=1e-6)


def test_dense_models_have_no_flatness_term_and_bad_modes_fail() -> None:
    assert float(flatness_loss(create_model("unet", widths=[8, 16]))) == 0.0
    with pytest.raises(ConfigError, match="flatness mode"):
        flatness_loss(create_model("unet-sfconv", widths=[8, 16]), mode="nope")
