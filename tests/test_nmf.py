"""The NMF layer: update formulas vs an independent numpy reference, convergence, fp16 safety, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfedge.errors import LayerError
from sfedge.nn import NMF, hals_step, mu_step, set_nmf_iterations


# -- independent numpy references (written from the formulas, loop per column) --
def np_hals_factor(xw: np.ndarray, gram: np.ndarray, f: np.ndarray, eps: float) -> np.ndarray:
    f = f.copy()
    for r in range(f.shape[1]):
        others = sum((f[:, j] * gram[j, r] for j in range(f.shape[1]) if j != r), np.zeros(f.shape[0]))
        f[:, r] = np.maximum(0.0, (xw[:, r] - others + eps) / (gram[r, r] + eps))
    return f


def np_hals_step(x: np.ndarray, u: np.ndarray, v: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    u = np_hals_factor(x @ v, v.T @ v, u, eps)
    v = np_hals_factor(x.T @ u, u.T @ u, v, eps)
    return u, v


def np_mu_step(x: np.ndarray, u: np.ndarray, v: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    u = u * (x @ v + eps) / (u @ (v.T @ v) + eps)
    v = v * (x.T @ u + eps) / (v @ (u.T @ u) + eps)
    return u, v


def _problem(rank: int, batch: int = 3, m: int = 6, n: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((batch, m, n)), rng.random((batch, m, rank)), rng.random((batch, n, rank))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("eps", [1e-8, 1e-2])
def test_hals_step_matches_numpy(rank: int, eps: float) -> None:
    x, u, v = _problem(rank)
    tu, tv = hals_step(torch.from_numpy(x), torch.from_numpy(u), torch.from_numpy(v), eps)
    for b in range(x.shape[0]):
        ru, rv = np_hals_step(x[b], u[b], v[b], eps)
        np.testing.assert_allclose(tu[b].numpy(), ru, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(tv[b].numpy(), rv, rtol=1e-10, atol=1e-12)


def test_hals_rank2_relu_clips_negative_columns() -> None:
    # Strongly correlated second column makes the Gauss-Seidel numerator negative.
    x = np.ones((1, 4, 5))
    u = np.array([[[1.0, 5.0]] * 4])
    v = np.array([[[1.0, 1.0]] * 5])
    tu, _ = hals_step(torch.from_numpy(x), torch.from_numpy(u), torch.from_numpy(v), 1e-8)
    ru, _ = np_hals_step(x[0], u[0], v[0], 1e-8)
    np.testing.assert_allclose(tu[0].numpy(), ru, rtol=1e-10, atol=1e-12)
    assert (tu >= 0).all()


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("eps", [1e-8, 1e-2])
def test_mu_step_matches_numpy(rank: int, eps: float) -> None:
    x, u, v = _problem(rank, seed=1)
    tu, tv = mu_step(torch.from_numpy(x), torch.from_numpy(u), torch.from_numpy(v), eps)
    for b in range(x.shape[0]):
        ru, rv = np_mu_step(x[b], u[b], v[b], eps)
        np.testing.assert_allclose(tu[b].numpy(), ru, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(tv[b].numpy(), rv, rtol=1e-10, atol=1e-12)


def test_steps_broadcast_batch_one_init() -> None:
    # NMF passes the (1, M, R) buffers straight in; the result must equal an explicit expand.
    x, u, v = _problem(2, batch=4)
    xt, ut, vt = torch.from_numpy(x), torch.from_numpy(u[:1]), torch.from_numpy(v[:1])
    for step in (hals_step, mu_step):
        a = step(xt, ut, vt, 1e-8)
        b = step(xt, ut.expand(4, -1, -1), vt.expand(4, -1, -1), 1e-8)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)


def test_module_runs_k_steps_from_buffers() -> None:
    layer = NMF(6, 10, rank=2, iterations=3, method="hals")
    x = torch.rand(2, 6, 10, dtype=torch.float64)
    u, v = layer.u0.double(), layer.v0.double()
    for _ in range(3):
        u, v = hals_step(x, u, v, 1e-8)
    torch.testing.assert_close(layer(x), u @ v.transpose(1, 2))


# -- convergence ---------------------------------------------------------------
def _near_rank1(m: int = 8, n: int = 64, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, m, 1, generator=g) + 0.1
    b = torch.rand(4, 1, n, generator=g) + 0.1
    return a @ b + noise * torch.rand(4, m, n, generator=g)


def _rel_err(layer: NMF, x: torch.Tensor, k: int) -> float:
    layer.iterations = k
    return float(torch.linalg.norm(x - layer(x)) / torch.linalg.norm(x))


def test_hals_rank1_converges_fast_on_near_rank1() -> None:
    x = _near_rank1()
    layer = NMF(8, 64, rank=1, iterations=5, method="hals")
    e1, e2, e5, e50 = (_rel_err(layer, x, k) for k in (1, 2, 5, 50))
    assert e50 <= e5 + 1e-6 <= e1 + 2e-6
    assert e50 < 0.01  # the noise floor
    assert abs(e2 - e50) < 1e-3
    layer.iterations = 2
    y2 = layer(x)
    layer.iterations = 50
    assert (y2 - layer(x)).abs().max() < 1e-3


def test_mu_error_non_increasing() -> None:
    x = _near_rank1(seed=1)
    layer = NMF(8, 64, rank=2, method="mu")
    errs = [_rel_err(layer, x, k) for k in (1, 2, 5, 20, 100)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.02


# -- precision -----------------------------------------------------------------
def _with_zero_window(dtype: torch.dtype) -> torch.Tensor:
    x = _near_rank1().to(dtype)
    x[1] = 0
    return x


@pytest.mark.parametrize("method", ["hals", "mu"])
def test_fp16_input_is_finite_and_matches_fp32(method: str) -> None:
    layer = NMF(8, 64, rank=1, iterations=5, method=method)
    x16 = _with_zero_window(torch.float16)
    y16 = layer(x16)
    assert y16.dtype == torch.float16
    assert torch.isfinite(y16).all()
    y32 = layer(x16.float())
    torch.testing.assert_close(y16.float(), y32, atol=2e-3, rtol=2e-3)
    assert y16[1].abs().max() < 1e-3  # the all-zero window stays (near) zero


def test_fp16_without_upcast_would_nan() -> None:
    # Why NMF upcasts: in fp16 eps=1e-8 rounds to 0 and an all-zero window gives 0/0.
    x = torch.zeros(1, 8, 64, dtype=torch.float16)
    u, v = hals_step(x, torch.rand(1, 8, 1).half(), torch.rand(1, 64, 1).half(), torch.tensor(1e-8).half())
    assert torch.isnan(v).any()


def test_half_module_and_autocast_stay_finite() -> None:
    layer = NMF(8, 64, rank=1, iterations=5).half()  # buffers become fp16; eps must not
    assert torch.isfinite(layer(_with_zero_window(torch.float16))).all()
    layer = NMF(8, 64, rank=1, iterations=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(_with_zero_window(torch.bfloat16))
    assert torch.isfinite(y).all()


def test_gradients_finite_through_unrolled_iterations() -> None:
    layer = NMF(8, 64, rank=1, iterations=5)
    x = _with_zero_window(torch.float32).requires_grad_(True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- init buffers, config --------------------------------------------------------
def test_init_buffers_seeded_and_in_state_dict() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b = NMF(8, 64, rank=2), NMF(8, 64, rank=2)
    assert torch.equal(torch.rand(3), before)  # construction does not consume the global RNG
    sd = a.state_dict()
    assert set(sd) == {"u0", "v0"}
    assert sd["u0"].shape == (1, 8, 2) and sd["v0"].shape == (1, 64, 2)
    assert torch.equal(a.u0, b.u0) and torch.equal(a.v0, b.v0)
    assert (a.u0 >= 0).all() and (a.u0 < 1).all()
    x = torch.rand(2, 8, 64)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(NMF(8, 64, rank=2, seed=1).u0, a.u0)


def test_iterations_settable_and_validated() -> None:
    model = torch.nn.Sequential(NMF(4, 4), NMF(4, 4, method="mu"))
    assert set_nmf_iterations(model, 2) == 2
    assert all(m.iterations == 2 for m in model)
    with pytest.raises(LayerError):
        set_nmf_iterations(model, 0)
    with pytest.raises(LayerError):
        NMF(4, 4, method="svd")
    with pytest.raises(LayerError):
        NMF(4, 4, rank=5)
    with pytest.raises(LayerError):
        NMF(4, 4)(torch.rand(2, 4, 5))


# -- export ------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "rank"), [("hals", 1), ("mu", 2)])
def test_dynamo_onnx_export_keeps_eps(tmp_path, method: str, rank: int) -> None:
    """onnxscript's optimizer drops ``x + 1e-8`` for scalar constants; NMF must survive it."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    layer = NMF(8, 64, rank=rank, iterations=3, method=method).eval()
    x = _with_zero_window(torch.float32)
    path = tmp_path / "nmf.onnx"
    torch.onnx.export(layer, (x,), str(path), dynamo=True, opset_version=17, external_data=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if rank == 1:
        assert ops <= {"MatMul", "Transpose", "Add", "Mul", "Div", "Relu", "Cast", "Identity"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, layer(x).numpy(), atol=1e-5)
