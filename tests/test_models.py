"""Model registry, conv factory, cost counting, checkpoints and the demo data/trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sfedge.checkpoint import load_checkpoint, save_checkpoint
from sfedge.errors import CheckpointError, ConfigError, UnknownNameError
from sfedge.models import create_model, list_models
from sfedge.nn import SFConv2d, count_macs, count_params


def test_registry_lists_both_families_and_rejects_unknown_names() -> None:
    assert {"unet", "unet-sfconv", "factorizer", "factorizer-sfconv"} <= set(list_models())
    with pytest.raises(UnknownNameError, match="valid models: .*unet"):
        create_model("resnet-9000")
    with pytest.raises(ConfigError, match="no config key.*valid keys"):
        create_model("unet", width=[8])


def test_vanilla_and_sfconv_differ_only_by_the_conv_factory() -> None:
    a = create_model("unet", widths=[8, 16, 32])
    b = create_model("unet-sfconv", widths=[8, 16, 32], s=0.5)
    assert {k: v for k, v in a.sfedge_config.items() if k not in ("conv", "s")} == {
        k: v for k, v in b.sfedge_config.items() if k not in ("conv", "s")
    }
    assert not any(isinstance(m, SFConv2d) for m in a.modules())
    n_dense_kxk = sum(1 for m in a.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert sum(1 for m in b.modules() if isinstance(m, SFConv2d)) == n_dense_kxk
    x = torch.randn(1, 3, 64, 64)
    assert a(x).shape == b(x).shape == (1, 1, 64, 64)
    assert count_params(b) < count_params(a)
    assert count_macs(b, (1, 3, 64, 64)) < count_macs(a, (1, 3, 64, 64))


def test_mac_count_matches_hand_count_for_one_conv() -> None:
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert count_macs(conv, (1, 4, 10, 10)) == 8 * 4 * 9 * 100
    sf = SFConv2d.from_dense(conv, rank=2)
    # conv A: 2 x 4 x 3 per pixel, conv B: 8 x 2 x 3 per pixel, both at 10x10.
    assert count_macs(sf, (1, 4, 10, 10)) == (2 * 4 * 3 + 8 * 2 * 3) * 100


def test_checkpoint_round_trip_rebuilds_the_model_by_name(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("unet-sfconv", widths=[8, 16], s=0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(model, path, metrics={"dice": 0.5})
    ck = load_checkpoint(path)
    assert ck.name == "unet-sfconv" and ck.config["s"] == 0.5 and ck.weights_sha256 == digest
    assert ck.metrics == {"dice": 0.5}
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(ck.model(x), model(x))


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(tmp_path) -> None:
    model = create_model("unet", widths=[8, 16])
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    data = bytearray(path.read_bytes())
    # Flip bytes in the tensor data (after the header): the weights hash no longer matches.
    data[-64:] = bytes(255 - b for b in data[-64:])
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors"):
        load_checkpoint(garbage)
    # A config that does not match the weights (widths edited in the header).
    from safetensors.torch import load_file, save_file

    from sfedge.checkpoint import read_checkpoint_header

    meta = read_checkpoint_header(path)
    meta["config"] = json.dumps({**json.loads(meta["config"]), "widths": [8, 32]})
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(path)), str(edited), metadata=meta)
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(edited)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_fundus_pseudo_labels_are_thin_vessels_inside_the_field_of_view() -> None:
    from sfedge.datasets.fundus import load_fundus, random_crops

    demo = load_fundus()
    assert demo.image.dtype == np.uint8 and demo.image.shape[2] == 3
    frac = demo.vessels.mean()
    assert 0.01 < frac < 0.15  # vessels are a small fraction of the image
    assert not demo.vessels[~demo.fov].any()
    imgs, masks = random_crops(demo, 4, 64, np.random.default_rng(0))
    assert imgs.shape == (4, 64, 64, 3) and masks.shape == (4, 64, 64)


def test_a_few_training_steps_lower_the_loss() -> None:
    from sfedge.train import TrainConfig, train

    torch.manual_seed(0)
    model = create_model("unet-sfconv", widths=[8, 16, 32])
    result = train(model, TrainConfig(steps=30, batch=4, crop=64, lr=3e-3))
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert 0.0 <= result.dice <= 1.0
    assert all(p.is_contiguous() for p in model.parameters())


def test_trained_demo_models_segment_vessels(demo_checkpoints) -> None:
    from sfedge.train import holdout_dice

    for name, path in demo_checkpoints.items():
        ck = load_checkpoint(path)
        dice = holdout_dice(ck.model)
        assert dice == pytest.approx(ck.metrics["holdout_dice"], abs=1e-6)
        assert dice > 0.6, f"{name}: held-out Dice {dice:.3f} against the Frangi pseudo-labels"
