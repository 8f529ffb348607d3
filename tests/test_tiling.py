"""Tiled inference (sfedge.tiling): MONAI's sliding_window_inference semantics, exactness where the model allows it,
and a numpy-only import path for devices."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sfedge.errors import ConfigError
from sfedge.models.tiled import torch_predictor
from sfedge.tiling import Tiling, importance_map, runner_predictor, scan_interval, tiled_predict, window_starts


def _conv_net(layers: int = 3, seed: int = 0) -> nn.Module:
    """Translation-equivariant: 3x3 'same' convs only (receptive-field radius = layers)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    ch = 3
    for i in range(layers):
        out = 2 if i == layers - 1 else 8
        mods += [nn.Conv2d(ch, out, 3, padding=1)] + ([nn.ReLU()] if i < layers - 1 else [])
        ch = out
    return nn.Sequential(*mods).eval()


def _import_monai_inferers():
    """monai.inferers, skipping the test where MONAI is missing.

    Importing monai also imports its TransChex net, which imports Hugging Face transformers when that is
    installed (it is, beside litert-torch): 20-30 s of imports the comparison never uses.  It is kept out
    during MONAI's import only, so transformers still imports normally for anything else.
    """
    if "monai.inferers" not in sys.modules and "transformers" not in sys.modules:
        sys.modules["transformers"] = None  # type: ignore[assignment]
        try:
            return pytest.importorskip("monai.inferers", reason="monai (the dev extra) is not installed")
        finally:
            del sys.modules["transformers"]
    return pytest.importorskip("monai.inferers", reason="monai (the dev extra) is not installed")


def _monai(x: np.ndarray, window, model: nn.Module, t: Tiling) -> np.ndarray:
    monai = _import_monai_inferers()
    with torch.no_grad():
        return monai.sliding_window_inference(
            torch.from_numpy(x), list(window), t.batch, model, overlap=t.overlap, mode=t.mode, sigma_scale=t.sigma_scale,
            padding_mode=t.padding_mode, cval=t.cval,
        ).numpy()


def _grid(overlaps, modes, paddings, batches) -> list[Tiling]:
    return [Tiling(overlap=o, mode=m, padding_mode=p, cval=c, batch=b)
            for o, m, (p, c), b in itertools.product(overlaps, modes, paddings, batches)]


MODES = ("constant", "gaussian")
PADDINGS = (("constant", 0.0), ("constant", -1.5), ("replicate", 0.0), ("reflect", 0.0), ("circular", 0.0))
CASES = [
    # windows inside a larger image: placement, overlap, blending and batching across two images
    ((2, 3, 90, 61), (32, 24), _grid((0.0, 0.25, 0.6), MODES, PADDINGS[:1], (1, 3))),
    # an image smaller than the window in one dim: every padding mode, then the crop back
    ((1, 3, 20, 50), (32, 32), _grid((0.25,), MODES, PADDINGS, (3,))),
    # the window is the image
    ((1, 3, 64, 64), (64, 64), _grid((0.5,), MODES, PADDINGS[:1], (1,))),
]


@pytest.mark.parametrize("shape,window,configs", CASES, ids=["inside", "padded", "whole"])
def test_matches_monai_sliding_window_inference(shape, window, configs) -> None:
    """Window placement, padding, importance maps, batching and normalisation: MONAI's, to float precision."""
    model = _conv_net(2)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for t in configs:
        ours = tiled_predict(x, window, torch_predictor(model), t)
        ref = _monai(x, window, model, t)
        assert ours.shape == ref.shape == (shape[0], 2, *shape[2:])
        assert np.abs(ours - ref).max() <= 1e-5 * float(np.abs(ref).max() + 1), t


@pytest.mark.slow
def test_matches_monai_on_trained_models_and_the_fundus_strip(demo_checkpoints) -> None:
    """The trained demo U-Net and a Factorizer (fixed 64x64 input) on the real held-out strip of the photograph."""
    from sfedge.checkpoint import load_checkpoint
    from sfedge.datasets.fundus import TRAIN_FRACTION, load_fundus_image
    from sfedge.models import create_model
    from sfedge.preprocess import FUNDUS_PREPROCESSING

    image, _ = load_fundus_image(0.5)
    x = FUNDUS_PREPROCESSING.apply(image[:, int(image.shape[1] * TRAIN_FRACTION):])[None]
    torch.manual_seed(0)
    factorizer = create_model("factorizer", widths=[8, 16], input_size=[64, 64]).eval()
    unet = load_checkpoint(demo_checkpoints["unet"]).model
    for model, window, t in ((unet, (256, 256), Tiling(overlap=0.25, mode="gaussian", batch=2)),
                             (factorizer, (64, 64), Tiling(overlap=0.5, mode="gaussian", batch=8)),
                             (factorizer, (64, 64), Tiling(overlap=0.0, mode="constant", batch=4))):
        ours = tiled_predict(x, window, torch_predictor(model), t)
        ref = _monai(x, window, model, t)
        scale = float(np.abs(ref).max())
        assert scale > 1e-3, "the model's output is not trivial"
        assert np.abs(ours - ref).max() <= 1e-5 * scale


def _valid_mask(image_size, window, starts, radius: int) -> np.ndarray:
    """Pixels that every covering window sees at least ``radius`` away from its inner (non-image) borders."""
    covered = np.zeros(image_size, int)
    valid = np.zeros(image_size, int)
    for st in starts:
        sl = tuple(slice(s, s + w) for s, w in zip(st, window))
        covered[sl] += 1
        inner = tuple(slice(s + (radius if s > 0 else 0), s + w - (radius if s + w < n else 0))
                      for s, w, n in zip(st, window, image_size))
        valid[inner] += 1
    return covered == valid


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_translation_equivariant_model_is_the_same_tiled_and_untiled_in_the_valid_region(overlap, mode) -> None:
    layers = 3
    model = _conv_net(layers)
    x = np.random.default_rng(1).standard_normal((1, 3, 150, 97)).astype(np.float32)
    window = (48, 40)
    whole = torch_predictor(model)(x)
    tiled = tiled_predict(x, window, torch_predictor(model), Tiling(overlap=overlap, mode=mode, batch=4))
    starts = window_starts(x.shape[2:], window, scan_interval(x.shape[2:], window, overlap))
    valid = _valid_mask(x.shape[2:], window, starts, layers)
    assert valid.mean() > 0.4, "the test must cover a real part of the image"
    assert np.abs(tiled - whole)[..., valid].max() < 1e-5
    assert np.abs(tiled - whole)[..., ~valid].max() > 1e-3, "outside the valid region windows do see cut context"


def test_window_equal_to_image_is_one_plain_inference() -> None:
    model = _conv_net()
    x = np.random.default_rng(2).standard_normal((2, 3, 40, 56)).astype(np.float32)
    for t in (Tiling(mode="gaussian", overlap=0.5), Tiling(mode="constant")):
        np.testing.assert_allclose(tiled_predict(x, (40, 56), torch_predictor(model), t), torch_predictor(model)(x),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("size,window,overlap", [(1411, 256, 0.25), (353, 128, 0.5), (128, 128, 0.5), (130, 128, 0.9),
                                                  (7, 3, 0.0)])
def test_windows_cover_the_image_and_the_last_is_flush_with_the_edge(size, window, overlap) -> None:
    starts = window_starts((size, size), (window, window), scan_interval((size, size), (window, window), overlap))
    rows = sorted({s[0] for s in starts})
    assert rows[0] == 0 and rows[-1] + window == size
    assert all(b - a <= max(1, int(window * (1 - overlap))) for a, b in zip(rows, rows[1:]))
    cover = np.zeros(size, int)
    for r in rows:
        cover[r : r + window] += 1
    assert cover.min() >= 1


def test_importance_maps() -> None:
    g = importance_map((64, 48), "gaussian", 0.125)
    assert g.shape == (64, 48) and g.dtype == np.float32 and g.min() >= 1e-3
    assert g.argmax() == np.ravel_multi_index((31, 23), g.shape) and np.allclose(g, g[::-1, ::-1])
    assert np.all(importance_map((5, 5), "constant") == 1)


@pytest.mark.parametrize("kw", [{"overlap": 1.0}, {"overlap": -0.1}, {"mode": "triangle"}, {"padding_mode": "zeros"},
                                {"batch": 0}, {"sigma_scale": 0}])
def test_bad_tiling_is_a_config_error(kw) -> None:
    with pytest.raises(ConfigError):
        Tiling(**kw)


def test_a_model_that_changes_the_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="spatial size"):
        tiled_predict(np.zeros((1, 3, 64, 64), np.float32), (32, 32), lambda b: b[:, :, ::2, ::2], Tiling())


class _StaticBatchRunner:
    """A runner whose artifact takes exactly 4 windows per call (the contract of Runner.run with a static batch)."""

    def __init__(self) -> None:
        from sfedge.artifact import TensorSpec

        self.inputs = [TensorSpec("x", [4, 3, 16, 16], "float32")]
        self.calls = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        assert x.shape[0] == 4, "a static-batch artifact only takes whole batches"
        self.calls += 1
        return x[:, :1] * 2


def test_runner_predictor_pads_short_batches_for_static_batch_artifacts() -> None:
    runner = _StaticBatchRunner()
    predict, batch = runner_predictor(runner)
    assert batch == 4
    x = np.random.default_rng(3).standard_normal((1, 3, 40, 40)).astype(np.float32)
    out = tiled_predict(x, (16, 16), predict, Tiling(overlap=0.25, batch=batch))
    np.testing.assert_allclose(out, 2 * x[:, :1], atol=1e-6)  # pointwise model: tiling is exact everywhere
    windows = len(window_starts((40, 40), (16, 16), scan_interval((40, 40), (16, 16), 0.25)))
    assert windows % 4, "the last batch must be short for this test to mean anything"
    assert runner.calls == -(-windows // 4)


def test_the_device_path_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['skimage'] = None\n"
            "import sfedge.tiling, sfedge.predict, sfedge.whole_image, sfedge.images, sfedge.commands.predict\n"
            "import sfedge.cli; sfedge.cli.build_parser()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
