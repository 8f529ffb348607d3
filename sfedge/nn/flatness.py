"""The singular-value flattening regularizer and its per-layer flatness metric.

The SFConv paper adds a KL term that pushes the factors' singular values towards
a flat (uniform) distribution; its exact form is not public (arXiv 2403.00606: no code, no full text), so this
module implements **our interpretation**, in two readings:

* ``"spectral"`` (default): p = sigma(F) / sum sigma(F) for each factor F in
  {P, Q} of every SFConv2d, and R = KL(p || U) = log n - H(p).  This matches the
  name "flattening singular values" best.
* ``"literal"``: p = softmax(vec F) over the factor's entries, R = KL(p || U).

KL is taken in the direction KL(p || uniform) (``F.kl_div(log_u, p)`` in
PyTorch's argument order), which is zero exactly when p is uniform.  The loss is
``lambda * sum over layers of R``; it is used in training only and costs nothing
at inference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sfedge.errors import ConfigError
from sfedge.nn.sfconv import SFConv2d

__all__ = ["FLATNESS_MODES", "kl_to_uniform", "flatness_loss", "flatness_report", "LayerFlatness"]

FLATNESS_MODES = ("spectral", "literal")


def kl_to_uniform(p: torch.Tensor) -> torch.Tensor:
    """KL(p || uniform) = log n - H(p) for a probability vector ``p`` (differentiable)."""
    n = p.numel()
    return (p * (p.clamp_min(1e-30).log() + math.log(n))).sum()


def _factor_distribution(factor: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "spectral":
        sv = torch.linalg.svdvals(factor.float())
        return sv / sv.sum().clamp_min(1e-12)
    if mode == "literal":
        return torch.softmax(factor.float().reshape(-1), dim=0)
    raise ConfigError(f"unknown flatness mode '{mode}'", f"valid modes: {', '.join(FLATNESS_MODES)}")


def layer_flatness_loss(layer: SFConv2d, mode: str = "spectral") -> torch.Tensor:
    """R for one layer: KL of P's distribution to uniform plus Q's."""
    return kl_to_uniform(_factor_distribution(layer.factor_p(), mode)) + kl_to_uniform(
        _factor_distribution(layer.factor_q(), mode)
    )


def flatness_loss(model: nn.Module, weight: float = 1e-3, mode: str = "spectral") -> torch.Tensor:
    """``weight * sum_layers R`` over every SFConv2d in ``model`` (0 when there is none)."""
    terms = [layer_flatness_loss(m, mode) for m in model.modules() if isinstance(m, SFConv2d)]
    if not terms:
        return torch.zeros(())
    return weight * torch.stack(terms).sum()


@dataclass
class LayerFlatness:
    """Flatness of one SFConv2d's composed spectrum (what reports print)."""

    name: str
    rank: int
    kl: float  # KL(p || U) of the composed matrix P Q's top-r singular values
    effective_rank: float  # exp(H(p)) (Roy & Vetterli); equals rank when perfectly flat
    kl_p: float
    kl_q: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def flatness_report(model: nn.Module) -> list[LayerFlatness]:
    """Per-layer flatness: KL to uniform and effective rank of each SFConv2d's spectrum."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, SFConv2d):
            continue
        w = (m.factor_p() @ m.factor_q()).double()
        sv = torch.linalg.svdvals(w)[: m.rank]
        p = sv / sv.sum().clamp_min(1e-30)
        kl = float(kl_to_uniform(p))
        rows.append(
            LayerFlatness(
                name=name,
                rank=m.rank,
                kl=kl,
                effective_rank=float(math.exp(math.log(m.rank) - kl)),
                kl_p=float(kl_to_uniform(_factor_distribution(m.factor_p(), "spectral"))),
                kl_q=float(kl_to_uniform(_factor_distribution(m.factor_q(), "spectral"))),
            )
        )
    return rows
