"""Rank sweep: factorize the trained demo U-Net at two ranks, build, check, profile; Pareto front and report."""

from __future__ import annotations

import json

import pytest

from sfedge.errors import ConfigError
from sfedge.sweep import SweepPoint, SweepResult, parse_s_values

SMALL_TARGET = """name = "sweep-test-cpu"
description = "ONNX Runtime on this CPU at 64x64 (a small, fast target for the sweep test)"
backend = ["onnxruntime"]
precisions = ["fp32"]
default_precision = "fp32"
layout = "NCHW"
threads = 1
input_size = [64, 64]
"""


@pytest.mark.slow
def test_sweep_builds_checks_profiles_and_finds_the_front(demo_checkpoints, tmp_path, sfedge_cli):
    from sfedge.checkpoint import read_checkpoint_header

    target = tmp_path / "sweep-test-cpu.toml"
    target.write_text(SMALL_TARGET)
    code, out, err = sfedge_cli(
        "sweep", str(demo_checkpoints["unet"]), "--target", str(target), "--s", "0.5,0.25",
        "--bundles", str(tmp_path / "bundles"), "-o", str(tmp_path / "sweep"),
        "--runs", "20", "--min-seconds", "0.2", "--warmup-seconds", "0.1", "--json", timeout=600,
    )
    assert code == 0, err
    result = json.loads(out)
    points = {p["name"]: p for p in result["points"]}
    assert list(points) == ["vanilla", "s=0.5", "s=0.25"]
    van, half, quarter = points["vanilla"], points["s=0.5"], points["s=0.25"]
    assert quarter["macs"] < half["macs"] < van["macs"], "lower rank, fewer MACs"
    for p in (half, quarter):
        assert p["error"] is None and p["bundle"]
        assert p["ratio_low"] <= p["ratio"] <= p["ratio_high"], "paired with vanilla, with a CI"
        assert p["parity"]["max_abs"] < 1e-3, "each artifact matches its own torch model (the build's gate)"
        assert 0 <= p["dice_agreement"] <= 1 and p["max_abs_vs_vanilla"] > p["parity"]["max_abs"]
    assert van["dice_agreement"] > 0.999, "the vanilla fp32 artifact agrees with the vanilla model"
    stored = json.loads(read_checkpoint_header(demo_checkpoints["unet"])["metrics"])["holdout_dice"]
    assert van["holdout_dice"] == pytest.approx(stored, abs=1e-6), "held-out Dice uses the labels the model trained on"

    for key, quality in (("pareto_parity", "dice_agreement"), ("pareto_dice", "holdout_dice")):
        front = [points[n] for n in result[key]]
        assert front and min(points.values(), key=lambda p: p["median_ms"]) in front, "the fastest point is on it"
        assert max(points.values(), key=lambda p: p[quality]) in front, "so is the best one"
        for p in front:  # no point is both faster and better
            assert not any(q["median_ms"] < p["median_ms"] and q[quality] > p[quality] for q in points.values())

    folder = tmp_path / "sweep"
    assert {f.name for f in folder.iterdir()} >= {"sweep.json", "sweep.csv", "sweep.md", "sweep.png", "profile"}
    assert (folder / "profile" / "report.json").is_file()
    assert "| s=0.25 |" in (folder / "sweep.md").read_text()


def test_s_values_are_checked():
    assert parse_s_values("1,0.5,0.25,0.5") == [1.0, 0.5, 0.25]
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        parse_s_values("0.5,2")
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_s_values("half")


def test_front_skips_points_without_measurements():
    pts = [SweepPoint("vanilla", None, "v", median_ms=10.0, dice_agreement=1.0),
           SweepPoint("s=0.5", 0.5, "a", median_ms=6.0, dice_agreement=0.97),
           SweepPoint("s=0.25", 0.25, "b", error="int8 artifact missed its parity tolerance"),
           SweepPoint("s=0.125", 0.125, "c", median_ms=7.0, dice_agreement=0.9)]
    result = SweepResult("unet", "host-cpu", "fp32", "onnxruntime", pts, None)
    assert [p.name for p in result.front("dice_agreement")] == ["s=0.5", "vanilla"]
    assert result.front("holdout_dice") == []
    assert "int8 artifact missed" in result.markdown()


def test_sweeping_an_sfconv_checkpoint_is_refused(demo_checkpoints, tmp_path, sfedge_cli):
    code, out, err = sfedge_cli("sweep", str(demo_checkpoints["unet-sfconv"]), "--s", "0.5",
                                "--bundles", str(tmp_path / "b"), timeout=120)
    assert code != 0 and "already an SFConv model" in err.strip().splitlines()[-1]
