"""The Factorizer U-Net: registry, shapes, SFConv variant, input checks, K at inference, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfedge.errors import ConfigError
from sfedge.models import create_model, list_models
from sfedge.models.factorizer import from_windows, to_windows
from sfedge.nn import NMF, SFConv2d, count_macs, count_params

SMALL = {"widths": [16, 32], "input_size": [32, 32]}


def test_registered() -> None:
    assert {"factorizer", "factorizer-sfconv", "unet", "unet-sfconv"} <= set(list_models())


@pytest.mark.parametrize("name", ["factorizer", "factorizer-sfconv"])
def test_forward_shape(name: str) -> None:
    model = create_model(name, out_channels=2)
    assert model.sfedge_config["input_size"] == [128, 128]
    with torch.no_grad():
        y = model(torch.randn(2, 3, 128, 128))
    assert y.shape == (2, 2, 128, 128)
    assert torch.isfinite(y).all()


def test_sfconv_variant_is_cheaper() -> None:
    dense, sf = create_model("factorizer"), create_model("factorizer-sfconv")
    assert not any(isinstance(m, SFConv2d) for m in dense.modules())
    # stem + 3 down convs
    assert sum(isinstance(m, SFConv2d) for m in sf.modules()) == 4
    shape = (1, 3, 128, 128)
    assert count_macs(sf, shape) < count_macs(dense, shape)
    assert count_params(sf) < count_params(dense)


def test_one_nmf_per_block_and_pos_embed_at_bottleneck_only() -> None:
    model = create_model("factorizer", depth=2)
    nmfs = [m for m in model.modules() if isinstance(m, NMF)]
    assert len(nmfs) == 2 * (4 + 3)
    pos = [n for n, _ in model.named_parameters() if n.endswith(".pos")]
    assert pos == ["encoder.3.pos"]
    assert model.encoder[3].pos.shape == (1, 128, 16, 16)


@pytest.mark.parametrize("shape", [(1, 3, 96, 128), (1, 3, 128, 64), (1, 1, 128, 128), (3, 128, 128)])
def test_wrong_input_raises_config_error(shape: tuple[int, ...]) -> None:
    model = create_model("factorizer")
    with pytest.raises(ConfigError, match="expects input"):
        model(torch.zeros(shape))


@pytest.mark.parametrize(
    "cfg",
    [
        {"input_size": [100, 128]},  # not a multiple of 2**3 * 8
        {"widths": [16, 36, 64, 128]},  # 36 % head_dim
        {"widths": [16]},
        {"method": "svd"},
        {"rank": 9},
        {"iterations": 0},
        {"conv": "depthwise"},
        {"swin": True, "patch": 5, "input_size": [40, 40], "widths": [16]},
    ],
)
def test_bad_config_raises_config_error(cfg: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("factorizer", **cfg)


def test_windows_are_head_by_pixel_matrices() -> None:
    b, heads, d, p, h, w = 2, 3, 4, 4, 8, 12
    x = torch.randn(b, heads * d, h, w)
    m = to_windows(x, d, p, h, w)
    hb, wb = h // p, w // p
    assert m.shape == (b * heads * hb * wb, d, p * p)
    for bi, hi, i, j in [(0, 0, 0, 0), (1, 2, 1, 2), (0, 1, 1, 0)]:
        idx = ((bi * heads + hi) * hb + i) * wb + j
        expect = x[bi, hi * d : (hi + 1) * d, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(d, p * p)
        assert torch.equal(m[idx], expect)
    assert torch.equal(from_windows(m, heads * d, h, w, p), x)


def test_iterations_settable_at_inference() -> None:
    model = create_model("factorizer", **SMALL, iterations=5).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y5 = model(x)
        assert model.set_nmf_iterations(2) == 3  # 2 encoder levels + 1 decoder level
        assert all(m.iterations == 2 for m in model.modules() if isinstance(m, NMF))
        y2 = model(x)
    assert not torch.equal(y5, y2)
    assert create_model("factorizer", **SMALL, iterations=2).encoder[0].blocks[0].mixer.nmf.iterations == 2


@pytest.mark.parametrize("cfg", [{}, {"swin": True}, {"rank": 2, "method": "mu"}])
def test_trains(cfg: dict) -> None:
    torch.manual_seed(0)
    model = create_model("factorizer-sfconv", **SMALL, **cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, target = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 32, 32).round()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()


# -- ONNX export ------------------------------------------------------------------
def _perturbed(name: str, **cfg: object) -> torch.nn.Module:
    """Seeded noise on every parameter (LayerNorm affine included) + one head forced to all-zero windows."""
    model = create_model(name, **cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        # Head 0 of the first block sees only zero matrices: exercises the eps guards (0/0 without them).
        in_proj = model.encoder[0].blocks[0].mixer.in_proj
        in_proj.weight[:8].zero_()
    return model


def _run_ort(path: str, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _max_rank(onnx_mod, path: str) -> int:
    model = onnx_mod.shape_inference.infer_shapes(onnx_mod.load(path))
    g = model.graph
    ranks = [len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.output, *g.value_info]]
    ranks += [len(t.dims) for t in g.initializer]
    return max(ranks)


@pytest.mark.parametrize(
    ("name", "cfg"),
    [("factorizer", {}), ("factorizer-sfconv", {**SMALL, "swin": True})],
    ids=["factorizer", "factorizer-sfconv-swin"],
)
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_matches_torch(tmp_path, name: str, cfg: dict, dynamo: bool) -> None:
    onnx = pytest.importorskip("onnx")
    model = _perturbed(name, **cfg)
    h, w = model.input_size
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.isfinite(ref).all() and ref.std() > 0.05  # not near-constant
    path = str(tmp_path / "model.onnx")
    extra = {"external_data": False} if dynamo else {}
    torch.onnx.export(model, (x,), path, dynamo=dynamo, opset_version=17, **extra)
    out = _run_ort(path, x)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() < 1e-4
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & {"ScatterND", "GatherND", "Einsum", "ScatterElements"}, ops
    if not dynamo:
        assert _max_rank(onnx, path) <= 5
