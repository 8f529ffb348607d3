"""sfedge's engine build through Polygraphy's real TensorRT loaders, with a recording TensorRT (tests/trt_recorder.py).

What these tests show: per TensorRT release and precision, which options sfedge asks for and what Polygraphy's
own code then asks TensorRT (network creation flags, builder flags, workspace, timing cache, calibrator), and that
sfedge's handling around Polygraphy holds (int8 that would not be int8 is refused, the calibration cache is
relabelled for the device and replayed by Polygraphy's Calibrator, a rejected timing cache is replaced, files are
written whole, Polygraphy's failures become one-line errors).  What they cannot show: that a real TensorRT accepts
the network and builds a correct engine; that takes a GPU (`sfedge doctor` on the device).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfedge.backends.tensorrt.builder import build_engine, build_options
from sfedge.backends.tensorrt.calibration_cache import write_calibration_cache
from sfedge.backends.tensorrt.commands import trtexec_command
from sfedge.backends.tensorrt.loaders import require_tensorrt
from sfedge.backends.tensorrt.runner import activation_bytes, engine_io
from sfedge.errors import BackendUnavailable, ConfigError, ExportError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trt_recorder import engine_record, installed_fake_tensorrt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCTOR_ONNX = ROOT / "sfedge" / "selftest" / "doctor.onnx"


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory) -> Path:
    """The doctor model with a symmetric int8 Q/DQ pair on its input (explicit quantization)."""
    model = onnx.load(str(DOCTOR_ONNX))
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["input.dq" if i == "input" else i for i in node.input]
    graph.initializer.extend([numpy_helper.from_array(np.array(1 / 127, np.float32), "input.scale"),
                              numpy_helper.from_array(np.array(0, np.int8), "input.zero")])
    graph.node.insert(0, helper.make_node("QuantizeLinear", ["input", "input.scale", "input.zero"], ["input.q"],
                                          name="input.quant"))
    graph.node.insert(1, helper.make_node("DequantizeLinear", ["input.q", "input.scale", "input.zero"], ["input.dq"],
                                          name="input.dequant"))
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    path = tmp_path_factory.mktemp("qdq") / "model.qdq.onnx"
    onnx.save(model, str(path))
    return path


def _build(version: str, tmp_path: Path, precision: str, onnx_path: Path = DOCTOR_ONNX, **kw):
    with installed_fake_tensorrt(version) as calls:
        result = build_engine(onnx_path, tmp_path / "out" / "model.engine", precision=precision, workspace_mb=512, **kw)
    return result, engine_record(result.engine_path), calls


# -- what sfedge asks for, per release and precision -------------------------------------------------------------
@pytest.mark.parametrize("version, precision, typed, network_flags, builder_flags", [
    ("8.5.2.2", "fp32", None, ["EXPLICIT_BATCH"], []),
    ("8.5.2.2", "fp16", None, ["EXPLICIT_BATCH"], ["FP16", "TF32"]),
    ("10.3.0.30", "fp32", None, [], []),
    ("10.3.0.30", "fp16", None, [], ["FP16", "TF32"]),
    ("10.3.0.30", "fp16", True, ["STRONGLY_TYPED"], ["TF32"]),
    ("11.0.0", "fp32", None, [], []),
    ("11.0.0", "fp16", None, [], ["TF32"]),  # 11: no precision flags, strongly typed without asking
])
def test_polygraphy_asks_tensorrt_for_the_flags_each_release_has(tmp_path, version, precision, typed, network_flags,
                                                                  builder_flags) -> None:
    result, record, calls = _build(version, tmp_path, precision, strongly_typed=typed)
    assert record["network_flags"] == network_flags
    assert record["builder_flags"] == builder_flags  # TF32 cleared for fp32 only, as trtexec --noTF32
    assert record["workspace"] == 512 << 20
    assert ("parse_from_file", DOCTOR_ONNX.name) in calls
    assert result.tensorrt == version and result.precision == precision and not result.implicit_int8
    assert result.strongly_typed == (typed is True or version.startswith("11"))
    assert result.engine_bytes == result.engine_path.stat().st_size


def test_build_options_make_the_same_choices_as_the_trtexec_command() -> None:
    """The Python build and build_engine.sh must build the same engine for a folder."""
    for version in ("8.5.2", "10.3", "11.0"):
        for precision, typed in (("fp32", None), ("fp16", None), ("fp16", True), ("int8", None), ("int8", True)):
            if typed and version.startswith("8"):  # 8.5 has no strongly typed networks
                continue
            options = build_options(version, precision, typed)
            cmd = trtexec_command("m.onnx", "m.engine", tensorrt_version=version, precision=precision, qdq=True,
                                  strongly_typed=typed)
            assert options.fp16 == ("--fp16" in cmd), (version, precision, typed)
            assert options.int8 == ("--int8" in cmd), (version, precision, typed)
            assert options.tf32 == ("--noTF32" not in cmd), (version, precision, typed)
            assert options.strongly_typed_flag == ("--stronglyTyped" in cmd), (version, precision, typed)


def test_int8_from_qdq_sets_int8_and_needs_no_calibrator(tmp_path, qdq_onnx) -> None:
    result, record, _ = _build("10.3.0.30", tmp_path, "int8", qdq_onnx)
    assert record["builder_flags"] == ["INT8", "TF32"] and record["calibration_cache_header"] is None
    assert not result.implicit_int8
    _, record11, _ = _build("11.0.0", tmp_path, "int8", qdq_onnx)
    assert record11["builder_flags"] == ["TF32"]  # 11: precision from the Q/DQ ONNX alone


# -- implicit INT8 from a calibration cache ----------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, base", [("EntropyCalibration2", "IInt8EntropyCalibrator2"),
                                             ("MinMaxCalibration", "IInt8MinMaxCalibrator")])
def test_implicit_int8_replays_the_cache_relabelled_for_the_device(tmp_path, algorithm, base) -> None:
    cache = write_calibration_cache({"input": 1.0, "logits": 3.0}, tmp_path / "calibration.cache",
                                    tensorrt_version="10.3", algorithm=algorithm)
    result, record, _ = _build("10.4.0.26", tmp_path, "int8", calibration_cache=cache)
    assert result.implicit_int8 and record["builder_flags"] == ["INT8", "TF32"]
    assert record["calibration_cache_header"] == f"TRT-100400-{algorithm}"  # 10.3's cache, relabelled for 10.4
    assert record["calibrator_base"] == base
    assert cache.read_text().startswith("TRT-100300-")  # the folder's file is left as written


def test_int8_without_qdq_or_cache_is_refused_before_building(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no Q/DQ nodes.*calibration cache"):
        _build("10.3.0.30", tmp_path, "int8")
    cache = write_calibration_cache({"input": 1.0}, tmp_path / "c.cache", tensorrt_version="10.3")
    with pytest.raises(ConfigError, match="weakly typed"):
        _build("10.3.0.30", tmp_path, "int8", calibration_cache=cache, strongly_typed=True)
    assert not (tmp_path / "out").exists()


def test_a_cache_tensorrt_ignores_fails_the_build_instead_of_calibrating_on_nothing(tmp_path, monkeypatch) -> None:
    """Without the relabelling, TensorRT ignores the cache and asks Polygraphy's Calibrator for a batch: it has none,
    so the build fails (trtexec in the same case calibrates on random data)."""
    import sfedge.backends.tensorrt.builder as builder

    monkeypatch.setattr(builder, "retarget_calibration_cache", lambda data, version: data)
    cache = write_calibration_cache({"input": 1.0}, tmp_path / "c.cache", tensorrt_version="10.3")
    with pytest.raises(ExportError, match=r"^TensorRT 10\.4\.0 failed to build an engine from doctor\.onnx: ") as err:
        _build("10.4.0.26", tmp_path, "int8", calibration_cache=cache)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "model.engine").exists() and not list((tmp_path / "out").glob("*"))


# -- timing cache, errors ----------------------------------------------------------------------------------------
def test_timing_cache_is_reused_replaced_when_rejected_and_written_whole(tmp_path) -> None:
    timing = tmp_path / "out" / "timing.cache"
    _, first, _ = _build("10.3.0.30", tmp_path, "fp16", timing_cache=timing)
    assert first["timing_cache"] == "" and timing.read_bytes() == b"fresh timing cache"
    timing.write_bytes(b"timings of this device")
    _, second, calls = _build("10.3.0.30", tmp_path, "fp16", timing_cache=timing)
    assert second["timing_cache"] == "timings of this device"
    timing.write_bytes(b"OTHER-DEVICE timings")
    _, third, calls = _build("10.3.0.30", tmp_path, "fp16", timing_cache=timing)
    assert ("set_timing_cache", "rejected") in calls and third["timing_cache"] == ""  # a fresh cache, not none
    assert timing.read_bytes() == b"fresh timing cache"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.engine", "timing.cache"]  # no .lock


def test_an_onnx_the_parser_rejects_is_one_line_export_error(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with installed_fake_tensorrt("10.3.0.30"), pytest.raises(ExportError, match="TensorRT 10.3.0 cannot parse bad.onnx: ") as err:
        build_engine(bad, tmp_path / "model.engine", precision="fp32")
    assert "\n" not in str(err.value) and "lint_onnx" in str(err.value)  # one line, with the fix
    assert not (tmp_path / "model.engine").exists()


def test_what_is_missing_is_said_precisely(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(BackendUnavailable, match="TensorRT's Python bindings are not installed"):
        build_engine(DOCTOR_ONNX, tmp_path / "m.engine", precision="fp32")
    stubs_only = tmp_path / "site" / "tensorrt"  # what the type stubs would look like on sys.path
    stubs_only.mkdir(parents=True)
    (stubs_only / "__init__.pyi").write_text("__version__: str\n")
    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(BackendUnavailable, match="is not TensorRT's bindings"):
        require_tensorrt()
    sys.modules.pop("tensorrt", None)


# -- the runner's per-release calls, on a recording engine ----------------------------------------------------------
class RecordingEngine:
    """An ICudaEngine stand-in that records which attributes sfedge reads; absent ones raise like TensorRT's."""

    # Which activation-memory attribute each release has: v2 from 10.1, v1 removed in 11.
    MEMORY = {"8.5": {"device_memory_size"}, "10.0": {"device_memory_size"},
              "10.3": {"device_memory_size", "device_memory_size_v2"}, "11.0": {"device_memory_size_v2"}}

    def __init__(self, release: str) -> None:
        self.read: list[str] = []
        self._has = {"num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_shape", "get_tensor_dtype"}
        self._has |= self.MEMORY[release]
        self._io = [("input", 1, (1, 3, 64, 64)), ("logits", 2, (1, 1, 64, 64))]

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._has:
            raise AttributeError(name)
        self.read.append(name)
        values = {"num_io_tensors": len(self._io), "device_memory_size": 111, "device_memory_size_v2": 222}
        if name in values:
            return values[name]
        by_name = {n: (mode, shape) for n, mode, shape in self._io}
        return {"get_tensor_name": lambda i: self._io[i][0], "get_tensor_mode": lambda n: by_name[n][0],
                "get_tensor_shape": lambda n: by_name[n][1], "get_tensor_dtype": lambda n: 0}[name]


@pytest.mark.parametrize("release, version, attribute", [
    ("8.5", "8.5.2", "device_memory_size"), ("10.0", "10.0.1", "device_memory_size"),
    ("10.3", "10.3.0", "device_memory_size_v2"), ("11.0", "11.0.0", "device_memory_size_v2")])
def test_runner_reads_the_memory_attribute_each_release_has(release, version, attribute) -> None:
    engine = RecordingEngine(release)
    assert activation_bytes(engine, version) == {"device_memory_size": 111, "device_memory_size_v2": 222}[attribute]
    assert engine.read == [attribute]


def test_runner_io_comes_from_the_name_based_api(monkeypatch) -> None:
    fake = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT=1, OUTPUT=2), nptype=lambda dtype: np.float32)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    engine = RecordingEngine("8.5")
    inputs, outputs = engine_io(engine)
    assert [(s.name, s.shape, s.dtype) for s in inputs] == [("input", [1, 3, 64, 64], "float32")]
    assert [(s.name, s.shape) for s in outputs] == [("logits", [1, 1, 64, 64])]
    assert set(engine.read) <= {"num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_shape",
                                "get_tensor_dtype"}  # never the bindings API removed in 10
    engine._io[0] = ("input", 1, (-1, 3, 64, 64))
    with pytest.raises(BackendUnavailable, match="dynamic tensor 'input'"):
        engine_io(engine)
