"""factorize() on a model sfedge did not define, fold() back, and the per-layer table."""

from __future__ import annotations

import torch
from torch import nn

from sfedge.nn import SFConv2d, count_macs, factorize, fold


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride > 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


class TinyResNet(nn.Module):
    """A ResNet-style classifier written here, not in sfedge, with a grouped conv that must be skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_factorize_any_model_keeps_shapes_and_reports_mac_reduction() -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    report = factorize(model, s=0.5, skip=["layer1.conv2"], input_shape=(1, 3, 32, 32))
    out = model(x)
    assert out.shape == ref.shape
    names = {r.name: r for r in report.rows}
    assert names["stem"].rank == 2 and isinstance(model.stem, SFConv2d)
    assert names["layer1.conv2"].rank is None and names["layer1.conv2"].note == "skipped by request"
    assert names["dw"].rank is None and "grouped" in names["dw"].note
    assert names["layer2.short.0"].rank is None and names["layer2.short.0"].note == "1x1 kernel"
    assert report.macs_after < report.macs_before and report.mac_reduction > 1
    assert report.macs_after == count_macs(model, (1, 3, 32, 32))
    for r in report.rows:
        if r.rank is not None:
            assert r.params_after < r.params_before and r.macs_after < r.macs_before


def test_factorize_at_full_rank_keeps_the_function_and_fold_restores_dense() -> None:
    torch.manual_seed(1)
    model = TinyResNet().eval()
    x = torch.randn(1, 3, 16, 16)
    ref = model(x)
    # s = k = 3 gives rank 3*min(Ci, Co): the full rank of the permuted matrix, so the function is unchanged.
    factorize(model, s=3.0)
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    folded = fold(model)
    assert folded and not any(isinstance(m, SFConv2d) for m in model.modules())
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
