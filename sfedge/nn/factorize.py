"""Turn any model's kxk convs into SFConv2d layers, and fold them back.

:func:`factorize` works on every ``nn.Module``, not only sfedge's models: it
walks the module tree, replaces each eligible ``nn.Conv2d`` by
``SFConv2d.from_dense`` (truncated SVD, so a trained model keeps most of its
function without retraining) and returns a per-layer table.  :func:`fold`
does the reverse per layer, which deployment uses where two thin convs run
slower than one dense conv on a target.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sfedge.errors import LayerError
from sfedge.nn.cost import macs_by_module
from sfedge.nn.sfconv import SFConv2d

__all__ = ["factorize", "fold", "FactorizeReport", "LayerChange", "eligible", "factorized_ranks"]


@dataclass
class LayerChange:
    """One row of the factorize table."""

    name: str
    shape: str  # "Co x Ci x kh x kw"
    stride: tuple[int, int]
    rank: int | None  # None: left dense
    params_before: int
    params_after: int
    macs_before: int | None  # None when no input shape was given
    macs_after: int | None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FactorizeReport:
    """Per-layer changes plus totals for the whole model."""

    rows: list[LayerChange] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None

    @property
    def mac_reduction(self) -> float | None:
        """Whole-model MACs before / after (the speed-up bound)."""
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def as_dict(self) -> dict:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "mac_reduction": self.mac_reduction,
        }


def eligible(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be factorized, or None when it can."""
    if isinstance(conv, nn.ConvTranspose2d):
        return "transposed conv (kept dense)"
    if not isinstance(conv, nn.Conv2d):
        return "not a Conv2d"
    if conv.groups != 1:
        return f"grouped (groups={conv.groups})"
    if tuple(conv.kernel_size) == (1, 1):
        return "1x1 kernel"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode}"
    if isinstance(conv.padding, str) and conv.padding not in ("valid", "same"):
        return f"padding={conv.padding}"
    return None


def _matches(name: str, skip: Iterable[str] | Callable[[str, nn.Module], bool], module: nn.Module) -> bool:
    if callable(skip):
        return bool(skip(name, module))
    return any(fnmatch.fnmatchcase(name, pat) for pat in skip)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def factorize(
    model: nn.Module,
    s: float | None = 0.25,
    *,
    rank: int | None = None,
    ranks: Mapping[str, int] | None = None,
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    input_shape: Sequence[int] | None = None,
) -> FactorizeReport:
    """Replace every eligible Conv2d of ``model`` (in place) by an SFConv2d initialised from it.

    Give one of ``s`` (rank ratio), ``rank`` (one rank for every layer) or
    ``ranks`` ({layer name: rank}: exactly those layers, as a checkpoint
    records them to rebuild a factorized model).  ``skip`` takes glob patterns
    of module names (``"encoder.0.*"``) or a predicate ``(name, module) ->
    bool``.  With ``input_shape`` (N, C, H, W) the table also has MACs before
    and after.  Returns the per-layer table; transposed convs, 1x1 and grouped
    convs are listed as kept dense, with the reason.
    """
    if ranks is not None:
        s = rank = None
    elif (s is None) == (rank is None):
        raise LayerError("give exactly one of s, rank or ranks", "e.g. factorize(model, s=0.25)")
    report = FactorizeReport(params_before=_params(model))
    before = macs_by_module(model, input_shape) if input_shape is not None else {}
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not _inside_sfconv(model, n)]
    if ranks is not None:
        unknown = sorted(set(ranks) - {n for n, _ in targets})
        if unknown:
            raise LayerError(f"no Conv2d named {', '.join(unknown[:3])} in this model",
                             "the ranks come from a checkpoint of a different architecture")
    changed: list[tuple[str, nn.Module]] = []
    for name, conv in targets:
        reason = eligible(conv)
        if reason is None and _matches(name, skip, conv):
            reason = "skipped by request"
        if reason is None and ranks is not None and name not in ranks:
            reason = "not factorized in the recorded model"
        if reason is not None:
            report.rows.append(
                LayerChange(
                    name, _shape(conv), tuple(conv.stride), None, _params(conv), _params(conv),  # type: ignore[arg-type]
                    before.get(name), before.get(name), note=reason,
                )
            )
            continue
        new = SFConv2d.from_dense(conv, s=s, rank=ranks[name] if ranks is not None else rank)
        _replace(model, name, new)
        changed.append((name, new))
        report.rows.append(
            LayerChange(name, _shape(conv), tuple(conv.stride), new.rank, _params(conv), _params(new),  # type: ignore[arg-type]
                        before.get(name), None)
        )
    report.params_after = _params(model)
    if input_shape is not None:
        after = macs_by_module(model, input_shape)
        for row in report.rows:
            row.macs_after = after.get(row.name, row.macs_before)
        report.macs_before, report.macs_after = before.get("", 0), after.get("", 0)
    return report


def _shape(conv: nn.Conv2d) -> str:
    co, ci, kh, kw = conv.weight.shape
    return f"{co}x{ci}x{kh}x{kw}"


def _inside_sfconv(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), SFConv2d):
            return True
    return False


@torch.no_grad()
def fold(model: nn.Module, only: Iterable[str] | Callable[[str, SFConv2d], bool] | None = None) -> list[str]:
    """Fold SFConv2d layers back into exact dense convs (in place); returns the folded names.

    ``only`` restricts folding to names matching glob patterns or a predicate;
    None folds every SFConv2d.
    """
    names = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, SFConv2d):
            continue
        if only is not None and not _matches(name, only, m):  # type: ignore[arg-type]
            continue
        _replace(model, name, m.to_dense())
        names.append(name)
    return names


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank} of every SFConv2d in ``model``: what rebuilds its structure (``factorize(..., ranks=)``)."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, SFConv2d)}
