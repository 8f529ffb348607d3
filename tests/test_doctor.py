"""`sfedge doctor`: what it says here (no GPU, no TensorRT), on a device (GPU probe, builder and runner replaced,
everything else real), and when something is broken; and the self-test model it ships."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import sfedge.backends.tensorrt.builder as builder_module
import sfedge.backends.tensorrt.runner as runner_module
import sfedge.commands.doctor as doctor
from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner
from sfedge.backends.tensorrt.gpu import DeviceReport, GpuInfo
from sfedge.backends.tensorrt.rules import lint_onnx
from sfedge.cli import main
from sfedge.errors import ExportError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doctor_model  # noqa: E402  (tests/doctor_model.py writes the shipped files)
from trt_recorder import ORIN, DriftingEngine, EngineAsOnnx, fake_build_engine  # noqa: E402

GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu")


# -- the shipped self-test model -------------------------------------------------------------------------------------
def test_shipped_selftest_files_are_what_the_generator_writes() -> None:
    assert doctor.SELFTEST_ONNX.read_bytes() == doctor_model.build_model().SerializeToString()
    shipped = np.load(doctor.SELFTEST_REFERENCE)
    x = doctor_model.reference_input()
    np.testing.assert_array_equal(shipped["input"], x)
    # The reference is ONNX Runtime's output; another ORT release may differ in the last bits, not more.
    np.testing.assert_allclose(shipped["logits"], doctor_model.reference_output(onnx.load(str(doctor.SELFTEST_ONNX)), x),
                               rtol=0, atol=1e-5)
    assert float(np.ptp(shipped["logits"])) > 1.0  # outputs spread over units: parity numbers mean something


@pytest.mark.parametrize("tensorrt", ["8.5.2", "10.3", "11.0"])
def test_selftest_onnx_is_clean_for_every_tensorrt_release_sfedge_targets(tensorrt) -> None:
    assert lint_onnx(doctor.SELFTEST_ONNX, tensorrt_version=tensorrt) == []


# -- here: nothing to check ---------------------------------------------------------------------------------------
@pytest.mark.skipif(any(Path(p).exists() for p in GPU_DEVICE_NODES), reason="a GPU is present")
def test_doctor_here_says_what_is_missing_and_exits_0(sfedge_cli) -> None:
    code, out, err = sfedge_cli("doctor", "--json", "--runs", "3")
    assert code == 0, err
    report = json.loads(out)  # stdout is pure JSON
    checks = {c["name"]: c for c in report["checks"]}
    assert report["status"] == "nothing-to-check" and report["exit_code"] == 0 and report["engine"] is None
    assert checks["gpu"]["status"] == "missing" and checks["tensorrt"]["status"] == "missing"
    assert "python3-libnvinfer" in checks["tensorrt"]["hint"] and "sfedge[tensorrt]" in checks["tensorrt"]["hint"]
    assert checks["engine build"]["status"] == "missing" and "gpu and tensorrt" in checks["engine build"]["detail"]
    assert checks["polygraphy"]["status"] == "ok"
    jetsons = [t for t in report["targets"] if t["backend"] == "tensorrt"]
    assert jetsons and all(not t["matches"] and t["why"] == "no CUDA GPU here" for t in jetsons)
    assert any(t["target"] == "host-cpu" and t["matches"] for t in report["targets"])
    code, out, err = sfedge_cli("doctor", "--runs", "3")
    assert code == 0 and "missing" in out and "nothing to check here" in out
    assert "pip install 'sfedge[tensorrt]'" in out  # rich markup does not swallow the extra's brackets


# -- on a device: GPU probe, builder and runner replaced ----------------------------------------------------------
@pytest.fixture()
def on_orin(monkeypatch):
    monkeypatch.setattr(doctor, "probe_device", lambda: DeviceReport(ORIN, ORIN.tensorrt, None, ORIN.jetson_model,
                                                                     ORIN.l4t))
    monkeypatch.setattr(builder_module, "build_engine", fake_build_engine)
    monkeypatch.setattr(runner_module, "TensorRTRunner", EngineAsOnnx)
    return monkeypatch


def _doctor_json(capsys) -> tuple[int, dict]:
    code = main(["doctor", "--json", "--runs", "5"])
    return code, json.loads(capsys.readouterr().out)


def test_doctor_on_a_device_builds_checks_times_the_engine_and_matches_targets(on_orin, capsys) -> None:
    code, report = _doctor_json(capsys)
    assert code == 0 and report["status"] == "ok"
    checks = {c["name"]: c for c in report["checks"]}
    assert [checks[n]["status"] for n in ("gpu", "tensorrt", "engine build", "engine parity")] == ["ok"] * 4
    assert "sm_87" in checks["gpu"]["detail"] and "DLA cores: 0" in checks["gpu"]["detail"]
    assert "Orin Nano" in checks["jetson"]["detail"]
    engine = report["engine"]
    assert engine["parity"]["max_abs"] <= doctor.TOLERANCE.max_abs and "ONNX Runtime" in engine["parity"]["reference"]
    assert engine["latency_ms"]["n"] == 5 and engine["latency_ms"]["median"] > 0
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["jetson-orin-nano"]["matches"] and targets["jetson-orin-nano"]["why"] == "matches"
    assert targets["jetson-agx-orin"]["matches"] and "0 DLA cores here, the target has 2" in targets["jetson-agx-orin"]["why"]
    assert not targets["jetson-xavier-nx"]["matches"] and "TensorRT 10.3.0.30" in targets["jetson-xavier-nx"]["why"]


class RecordedEngine(Runner):
    """An engine stand-in that needs no ONNX Runtime: it answers the shipped input with the shipped output."""

    backend = "tensorrt"

    def _load(self) -> None:
        self._ref = np.load(doctor.SELFTEST_REFERENCE)
        self.inputs = [TensorSpec("input", [1, 3, 64, 64], "float32")]
        self.outputs = [TensorSpec("logits", [1, 1, 64, 64], "float32")]

    def _infer(self, feed):
        assert np.array_equal(feed["input"], self._ref["input"])
        return {"logits": self._ref["logits"] + np.float32(1e-6)}

    def _close(self) -> None:
        pass


def test_doctor_without_onnxruntime_checks_against_the_shipped_reference(on_orin, capsys) -> None:
    on_orin.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails, as on a device without it
    on_orin.setattr(runner_module, "TensorRTRunner", RecordedEngine)
    code, report = _doctor_json(capsys)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0 and report["engine"]["parity"]["reference"].startswith("the reference outputs shipped")
    assert checks["onnxruntime"]["status"] == "info" and "not installed" in checks["onnxruntime"]["detail"]
    assert report["engine"]["parity"]["max_abs"] < 1e-5


def test_doctor_reports_an_engine_that_disagrees_as_broken(on_orin, capsys) -> None:
    on_orin.setattr(runner_module, "TensorRTRunner", DriftingEngine)
    code, report = _doctor_json(capsys)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == doctor.EXIT_BROKEN == 1 and report["status"] == "broken"
    assert checks["engine parity"]["status"] == "broken" and "max abs 0.01" in checks["engine parity"]["detail"]


def test_doctor_reports_a_failed_build_and_a_broken_tensorrt(on_orin, capsys) -> None:
    def fail(*args, **kwargs):
        raise ExportError("TensorRT 10.3.0 failed to build an engine from doctor.onnx: out of memory", "try less")

    on_orin.setattr(builder_module, "build_engine", fail)
    code, report = _doctor_json(capsys)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1 and checks["engine build"]["status"] == "broken" and "out of memory" in checks["engine build"]["detail"]
    broken = GpuInfo(**{**ORIN.as_dict(), "tensorrt_error": "RuntimeError: CUDA initialization failure", "dla_cores": None})
    on_orin.setattr(doctor, "probe_device", lambda: DeviceReport(broken, broken.tensorrt, broken.tensorrt_error))
    code, report = _doctor_json(capsys)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1 and checks["tensorrt"]["status"] == "broken" and "CUDA initialization" in checks["tensorrt"]["detail"]
    assert report["engine"] is None and checks["engine build"]["status"] == "missing"
