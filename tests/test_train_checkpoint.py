"""`sfedge train` never loses a run: fixed-size models (the Factorizer) are evaluated tiled, and the checkpoint is
written before the held-out evaluation, so an evaluation failure leaves it on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

TINY = '{"widths": [8, 16], "input_size": [32, 32]}'  # a Factorizer that trains in seconds


@pytest.mark.slow
def test_cli_trains_a_tiny_factorizer_with_tiled_holdout_dice(sfedge_cli, tmp_path) -> None:
    rc, out, err = sfedge_cli("train", "factorizer", "--config", TINY, "--steps", "4", "--batch", "2",
                              "-o", "fz.safetensors", "--json")
    assert rc == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["input_shape"] == [1, 3, 32, 32] and summary["evaluation_error"] is None

    from sfedge.checkpoint import load_checkpoint
    from sfedge.datasets.fundus import holdout_region, load_fundus
    from sfedge.train import holdout_dice

    ck = load_checkpoint(tmp_path / "fz.safetensors")
    assert ck.name == "factorizer" and ck.config["input_size"] == [32, 32]
    dice = ck.metrics["holdout_dice"]
    assert isinstance(dice, float) and 0.0 <= dice <= 1.0 and dice == summary["holdout_dice"]
    assert holdout_dice(ck.model) == pytest.approx(dice, abs=1e-9), "the stored Dice is the tiled evaluation's"
    image, _, _ = holdout_region(load_fundus(), 16)
    assert image.shape[0] > 32 and image.shape[1] > 32, "the held-out strip is larger than one window"


@pytest.mark.slow
def test_an_evaluation_failure_still_leaves_the_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    import sfedge.train
    from sfedge.checkpoint import load_checkpoint
    from sfedge.cli import main

    def broken(*args: object, **kwargs: object) -> float:
        raise RuntimeError("held-out data unavailable\nsecond line")

    monkeypatch.setattr(sfedge.train, "holdout_dice", broken)
    out = tmp_path / "fz.safetensors"
    rc = main(["train", "factorizer", "--config", TINY, "--steps", "3", "--batch", "2", "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "held-out data unavailable" in warnings[0] and str(out) in warnings[0]
    summary = json.loads(captured.out[captured.out.index("{"):])
    assert summary["holdout_dice"] is None and "RuntimeError" in summary["evaluation_error"]
    ck = load_checkpoint(out)  # loads, hash checked: a whole checkpoint, not a half-written one
    assert ck.metrics["holdout_dice"] is None and "held-out data unavailable" in ck.metrics["evaluation_error"]
    x = np.zeros((1, 3, 32, 32), np.float32)
    import torch

    assert ck.model(torch.from_numpy(x)).shape == (1, 1, 32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["fz.safetensors"], "no temporary files left"
