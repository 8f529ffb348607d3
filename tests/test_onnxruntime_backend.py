"""The onnxruntime backend: its runner, and make() for fp32 / int8 (mixed precision) / fp16 on the trained demo models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfedge.backends.maker import maker
from sfedge.backends.registry import runner_class, runner_for
from sfedge.errors import ExportError, ParityError
from sfedge.onnx_metadata import read_onnx_metadata

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ort")


@pytest.fixture(scope="module")
def fp32(demo_sources, host_target, fundus_calibration, workdir):
    return maker("onnxruntime")(demo_sources["unet-sfconv"], host_target, "fp32", fundus_calibration, workdir)


def test_registry_finds_the_runner(fp32) -> None:
    from sfedge.backends.onnxruntime.runner import OnnxRuntimeRunner

    assert runner_class("onnxruntime") is OnnxRuntimeRunner
    assert isinstance(runner_for(fp32.path, threads=2), OnnxRuntimeRunner)


def test_runner_prepare_finish_round_trip(fp32, demo_sources, fundus_calibration, host_target) -> None:
    x = fundus_calibration.holdout[:3]
    with runner_for(fp32.path, threads=host_target.threads) as runner:
        (spec,), (out_spec,) = runner.inputs, runner.outputs
        assert (spec.name, spec.shape, spec.dtype, spec.layout) == ("input", [1, 3, 256, 256], "float32", "NCHW")
        assert (out_spec.name, out_spec.shape, out_spec.dtype) == ("output", [1, 1, 256, 256], "float32")
        feed = runner.prepare(x[:1])
        assert list(feed) == ["input"] and feed["input"].dtype == np.float32
        np.testing.assert_array_equal(feed["input"], x[:1])
        raw = runner.infer(feed)
        y = runner.finish(raw)
        assert y.dtype == np.float32 and y.shape == (1, 1, 256, 256)
        np.testing.assert_allclose(y, demo_sources["unet-sfconv"].reference(x[:1]), atol=1e-4)
        batch = runner.run(x)  # one sample at a time, concatenated
        assert batch.shape == (3, 1, 256, 256)
        np.testing.assert_allclose(batch[:1], y, atol=1e-6)
        random = runner.random_feed()
        assert runner.infer(random)["output"].shape == (1, 1, 256, 256)
        mem = runner.memory_info()
        assert mem["weights_bytes"] > 0 and mem["file_bytes"] >= mem["weights_bytes"] and "rss_load_bytes" in mem
        versions = runner.versions()
    import onnxruntime

    assert versions["onnxruntime"] == onnxruntime.__version__


def test_runner_reports_a_missing_file_in_one_line(tmp_path) -> None:
    with pytest.raises(ExportError, match="does not exist") as err:
        with runner_for(tmp_path / "nope.onnx"):
            pass
    assert "\n" not in str(err.value)


def test_make_fp32_meets_the_targets_tolerance(fp32, host_target) -> None:
    assert fp32.path.is_file() and fp32.precision == "fp32"
    assert host_target.tolerance("fp32").failures(fp32.parity) == []
    assert fp32.parity.samples == 16


@pytest.mark.parametrize("name", [pytest.param("unet", marks=pytest.mark.tier2), "unet-sfconv"])
def test_make_int8_reaches_the_int8_tolerance_with_mixed_precision(
    name, demo_sources, host_target, fundus_calibration, workdir
) -> None:
    """The TRAINED demo models: Q/DQ int8 with the fewest float layers that give mask Dice agreement >= 0.98."""
    art = maker("onnxruntime")(demo_sources[name], host_target, "int8", fundus_calibration, workdir)
    tol = host_target.tolerance("int8")
    assert tol.dice_agreement is not None and tol.dice_agreement >= 0.98
    assert tol.failures(art.parity) == [] and art.parity.samples == 16
    mp = art.meta["mixed_precision"]
    assert mp["met"] and set(mp["float_layers"]) == set(art.float_layers)
    table = art.meta["sensitivity"]
    if tol.failures(mp["all_int8_parity"]):  # all-int8 missed: the search moved layers to float, in its order
        ranked = table if mp.get("order", "gain per cost") == "gain per cost" else sorted(
            table, key=lambda s: s["score"], reverse=True)  # the fallback pass: error alone
        ranking = [s["layer"] for s in ranked]
        assert art.float_layers and set(art.float_layers) == set(ranking[: len(art.float_layers)])
        assert len(table) == art.meta["layers"]
        assert all({"layer", "role", "dice_agreement", "score", "cost"} <= set(s) for s in table)
        assert all(np.isfinite(s["score"]) and s["samples"] == 8 for s in table)  # ranked on calibration samples
        assert 0 < mp["float_cost"] < mp["total_cost"]
    else:  # all-int8 met the tolerance: nothing was ranked, nothing stayed float
        assert table == [] and art.float_layers == []
    assert read_onnx_metadata(art.path)["float_layers"] == art.float_layers
    # Both range methods were tried; the one kept met the gate with less float cost, and its ranges are stored.
    method = art.meta["calibration_method"]
    assert method in ("entropy", "percentile") and set(mp["methods"]) == {"entropy", "percentile"}
    ranges_file = art.path.with_name(art.meta["ranges_file"])
    assert ranges_file in art.files and json.loads(ranges_file.read_text())["method"] == method
    # The file on disk is what was checked.
    with runner_for(art.path, threads=host_target.threads) as runner:
        y = runner.run(fundus_calibration.holdout[:2])
    from sfedge.parity import compare_outputs

    assert compare_outputs(demo_sources[name].reference(fundus_calibration.holdout[:2]), y).cosine > 0.99


def test_make_fp16_runs_in_onnxruntime(demo_sources, host_target, fundus_calibration, workdir) -> None:
    art = maker("onnxruntime")(demo_sources["unet"], host_target, "fp16", fundus_calibration, workdir)
    assert art.precision == "fp16" and read_onnx_metadata(art.path)["precision"] == "fp16"
    assert host_target.tolerance("fp16").failures(art.parity) == []
    assert art.parity.max_abs > 0  # really fp16


def test_make_refuses_an_artifact_outside_the_tolerance(demo_sources, fundus_calibration, workdir) -> None:
    """A target demanding fp32-grade agreement from fp16 gets a one-line ParityError naming the artifact."""
    from dataclasses import replace

    from sfedge.parity import Tolerance
    from sfedge.targets import load_target

    strict = replace(load_target("host-cpu"), tolerances={"fp32": Tolerance(max_abs=1e-4), "fp16": Tolerance(max_abs=1e-7)})
    with pytest.raises(ParityError, match="the fp16 ONNX Runtime artifact .* disagrees") as err:
        maker("onnxruntime")(demo_sources["unet"], strict, "fp16", fundus_calibration, workdir / "strict")
    assert "\n" not in str(err.value)
    assert not list((workdir / "strict").glob("*fp16*"))  # the failing artifact is not left behind
