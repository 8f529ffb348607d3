"""Nonnegative matrix factorization as a differentiable, exportable layer.

Factorizer (arXiv 2202.12295) replaces attention by a low-rank NMF of each
(head, window) matrix: ``X ~ U V^T`` with ``U, V >= 0`` found by a fixed number
``K`` of HALS or multiplicative-update (MU) iterations, unrolled so autograd
differentiates through every step.  The reconstruction ``U V^T`` is the layer
output.

Design choices, each forced by a deployment target:

* The initial factors ``u0 ~ U(0,1)`` and ``v0 ~ U(0,1)`` are drawn **once**
  from a seeded generator and stored as buffers (broadcast over the batch),
  so the layer is deterministic and exports as constants.
* The iterations always run in (at least) fp32: with fp16 ``eps = 1e-8``
  underflows to 0 and an all-zero window gives ``0/0 = NaN``.
* Rank 1 (the paper's setting) uses only MatMul/Transpose/Mul/Div/Add/ReLU;
  rank >= 2 builds the HALS columns in a Python list and concatenates them
  (slices, no in-place index assignment, hence no ScatterND in ONNX).
* No einsum and no ``.mT`` (the legacy ONNX exporter rejects ``.mT``).
* Inside :class:`NMF` the ``eps`` is a (1, 1, 1) tensor, not a Python float:
  the dynamo ONNX exporter's onnxscript optimizer removes ``x + c`` as a no-op
  when the *scalar* ``c`` is within ``abs_tol=1e-8`` of zero, which deletes
  the paper's ``eps = 1e-8`` and turns all-zero windows into ``0/0 = NaN``.
  Its pattern only matches 0-d constants, so a rank-3 eps survives.  (It is
  built in ``forward``, not stored as a buffer, so ``.half()`` cannot flush
  it to zero.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from sfedge.errors import LayerError

__all__ = ["NMF", "NMF_METHODS", "hals_step", "mu_step", "set_nmf_iterations"]

NMF_METHODS = ("hals", "mu")

Eps = float | torch.Tensor  # a float, or a broadcastable tensor (what NMF passes, see the module doc)


def _t(a: torch.Tensor) -> torch.Tensor:
    """Swap the last two dims (``.mT`` without breaking the legacy ONNX exporter)."""
    return a.transpose(-2, -1)


def _hals_factor(xw: torch.Tensor, gram: torch.Tensor, factor: torch.Tensor, eps: Eps) -> torch.Tensor:
    """One HALS sweep over the columns of ``factor`` (Gauss-Seidel: later columns see new earlier ones).

    ``xw`` is X W (..., M, R), ``gram`` is W^T W (..., R, R) for the *other*
    factor W; column r becomes
    ``ReLU((xw_r - sum_{j!=r} f_j gram_jr + eps) / (gram_rr + eps))``.
    """
    rank = factor.shape[-1]
    if rank == 1:
        # Empty sum over j != r: only MatMul/Add/Div/ReLU reach the graph.
        return torch.relu((xw + eps) / (gram + eps))
    cols = [factor[..., j : j + 1] for j in range(rank)]
    for r in range(rank):
        num = xw[..., r : r + 1]
        for j in range(rank):
            if j != r:
                num = num - cols[j] * gram[..., j : j + 1, r : r + 1]
        cols[r] = torch.relu((num + eps) / (gram[..., r : r + 1, r : r + 1] + eps))
    return torch.cat(cols, dim=-1)


def hals_step(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: Eps = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One HALS iteration for ``x ~ u v^T``: update ``u`` (all columns), then ``v`` with the new ``u``.

    Shapes: ``x`` (B, M, N), ``u`` (B|1, M, R), ``v`` (B|1, N, R).  HALS is the
    paper's default: it converges in far fewer iterations than MU.
    """
    u = _hals_factor(torch.matmul(x, v), torch.matmul(_t(v), v), u, eps)
    v = _hals_factor(torch.matmul(_t(x), u), torch.matmul(_t(u), u), v, eps)
    return u, v


def mu_step(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: Eps = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One multiplicative-update iteration (Lee & Seung): ``u`` first, then ``v`` with the new ``u``.

    ``u <- u * (x v + eps) / (u (v^T v) + eps)`` and likewise for ``v`` with
    ``x^T``; kept as the paper's alternative to HALS (same shapes as
    :func:`hals_step`).
    """
    u = u * (torch.matmul(x, v) + eps) / (torch.matmul(u, torch.matmul(_t(v), v)) + eps)
    v = v * (torch.matmul(_t(x), u) + eps) / (torch.matmul(v, torch.matmul(_t(u), u)) + eps)
    return u, v


_STEPS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"hals": hals_step, "mu": mu_step}


class NMF(nn.Module):
    """Rank-``rank`` NMF of a batch of nonnegative (M x N) matrices, returning ``U V^T``.

    ``iterations`` (K) is a settable attribute so it can be lowered at inference
    (rank-1 HALS converges in ~2 steps on near-rank-1 windows); the init
    buffers ``u0`` (1, M, R) and ``v0`` (1, N, R) are drawn from
    ``torch.Generator().manual_seed(seed)``, so two constructions are
    identical and the global RNG is not consumed.
    """

    u0: torch.Tensor
    v0: torch.Tensor

    def __init__(
        self,
        rows: int,
        cols: int,
        rank: int = 1,
        iterations: int = 5,
        method: str = "hals",
        eps: float = 1e-8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in NMF_METHODS:
            raise LayerError(f"unknown NMF method '{method}'", f"valid methods: {', '.join(NMF_METHODS)}")
        if not (isinstance(rank, int) and 1 <= rank <= min(rows, cols)):
            raise LayerError(f"NMF rank must be an int in 1..{min(rows, cols)}, got {rank!r}", "the paper uses rank=1")
        if not eps > 0:
            raise LayerError(f"NMF eps must be > 0, got {eps}", "the paper uses eps=1e-8")
        self.rows, self.cols, self.rank, self.method, self.eps = rows, cols, rank, method, float(eps)
        self.iterations = iterations
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("u0", torch.rand(1, rows, rank, generator=gen))
        self.register_buffer("v0", torch.rand(1, cols, rank, generator=gen))

    @property
    def iterations(self) -> int:
        """Number K of unrolled update steps (>= 1)."""
        return self._iterations

    @iterations.setter
    def iterations(self, k: int) -> None:
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise LayerError(f"NMF iterations must be an int >= 1, got {k!r}", "the paper trains with 5")
        self._iterations = k

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, rank={self.rank}, iterations={self.iterations}, method={self.method}, eps={self.eps:g}"

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(U, V)`` after K iterations, in the compute dtype (>= fp32)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a static check, not data flow
            bad = x.dim() != 3 or (int(x.shape[-2]), int(x.shape[-1])) != (self.rows, self.cols)
        if bad:
            raise LayerError(
                f"NMF expects (B, {self.rows}, {self.cols}) matrices, got {tuple(x.shape)}",
                "build NMF(rows, cols) to match the matricized input",
            )
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        u, v = self.u0.to(dtype), self.v0.to(dtype)
        eps = torch.full((1, 1, 1), self.eps, dtype=dtype, device=x.device)  # rank 3: see the module doc
        step = _STEPS[self.method]
        with warnings.catch_warnings():
            # The only Python branch on a shape (rank == 1) is static by
            # construction (the buffers fix R), so the tracer's warning is noise.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for _ in range(self.iterations):
                u, v = step(x, u, v, eps)
        return u, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x`` (B, M, N) as ``U V^T`` in ``x``'s dtype, computed in fp32 or wider."""
        if torch.is_autocast_enabled(x.device.type):
            # Autocast would run the matmuls in fp16 again; the eps guards need fp32.
            with torch.autocast(device_type=x.device.type, enabled=False):
                u, v = self.factors(x)
                return torch.matmul(u, _t(v)).to(x.dtype)
        u, v = self.factors(x)
        return torch.matmul(u, _t(v)).to(x.dtype)


def set_nmf_iterations(model: nn.Module, k: int) -> int:
    """Set K on every :class:`NMF` in ``model`` (fewer steps = faster inference); returns how many were set."""
    layers = [m for m in model.modules() if isinstance(m, NMF)]
    for m in layers:
        m.iterations = k
    return len(layers)
