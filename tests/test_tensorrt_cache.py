"""TensorRT's calibration cache (written from real ranges, parsed back) and the engine cache."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from sfedge.backends.tensorrt.calibration_cache import (
    calibration_cache_header,
    read_calibration_cache,
    retarget_calibration_cache,
    write_calibration_cache,
)
from sfedge.backends.tensorrt.engine_cache import EngineCache, engine_cache_key
from sfedge.errors import CalibrationError, ConfigError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def real_ranges(demo_checkpoints, fundus_calibration, tmp_path_factory):
    """(onnx path, minmax ranges) of the trained U-Net on real fundus crops (centre 64x64)."""
    from exporting import export_checked

    from sfedge.checkpoint import load_checkpoint
    from sfedge.quantize.ranges import compute_ranges
    from sfedge.source import ModelSource

    calib = dataclasses.replace(fundus_calibration, calibration=fundus_calibration.calibration[:8, :, 96:160, 96:160],
                                holdout=fundus_calibration.holdout[:4, :, 96:160, 96:160])
    source = ModelSource.from_checkpoint(load_checkpoint(demo_checkpoints["unet"]), (64, 64))
    path = tmp_path_factory.mktemp("calib") / "unet.onnx"
    export_checked(source, path, check_inputs=calib.holdout)
    return path, compute_ranges(path, calib, "minmax")


@pytest.mark.parametrize("version, header", [
    ("8.5.2", "TRT-8502-EntropyCalibration2"),  # 8.x: major*1000 + minor*100 + patch
    ("10.3", "TRT-100300-EntropyCalibration2"),  # 10.x: major*10000 + minor*100 + patch
])
def test_calibration_cache_round_trips(real_ranges, tmp_path, version, header) -> None:
    onnx_path, ranges = real_ranges
    path = write_calibration_cache(ranges, tmp_path / "calibration.cache", tensorrt_version=version)
    lines = path.read_text().splitlines()
    assert lines[0] == header
    assert all(len(ln.rpartition(": ")[2]) == 8 for ln in lines[1:])  # one "name: 8 hex digits" line per tensor
    got_header, got = read_calibration_cache(path)
    assert got_header == header
    assert list(got) == list(ranges)  # every tensor, in order, names intact
    for name, amax in ranges.items():  # amax -> float32(amax / 127) -> * 127
        assert got[name] == pytest.approx(amax, rel=1e-6, abs=1e-30)


def test_cache_lines_are_big_endian_float32_scales(tmp_path) -> None:
    path = write_calibration_cache({"input": 1.0, "t": 12.7}, tmp_path / "c.cache", tensorrt_version="10.3")
    lines = dict(ln.split(": ") for ln in path.read_text().splitlines()[1:])
    assert struct.unpack(">f", bytes.fromhex(lines["input"]))[0] == np.float32(1 / 127)
    assert struct.unpack(">f", bytes.fromhex(lines["t"]))[0] == np.float32(0.1)


def test_cache_covers_the_tensors_tensorrt_sees(real_ranges) -> None:
    """Keys are the ONNX tensor names, which is how TensorRT's ONNX parser names its network tensors."""
    import onnx

    onnx_path, ranges = real_ranges
    model = onnx.load(str(onnx_path))
    inits = {t.name for t in model.graph.initializer}
    activations = {t for n in model.graph.node for t in [*n.input, *n.output] if t and t not in inits}
    assert set(ranges) == activations


def test_tensorrt_11_has_no_calibration_cache(tmp_path) -> None:
    with pytest.raises(ConfigError, match="implicit INT8 was removed in 11"):
        write_calibration_cache({"x": 1.0}, tmp_path / "c.cache", tensorrt_version="11.0")
    assert not (tmp_path / "c.cache").exists()


def test_bad_caches_and_ranges_are_refused(tmp_path) -> None:
    bad = tmp_path / "onnxruntime.cache"
    bad.write_text("x 0.5 1.0\n")  # not TensorRT's format
    with pytest.raises(CalibrationError, match="not a TensorRT calibration cache"):
        read_calibration_cache(bad)
    with pytest.raises(CalibrationError, match="range"):
        write_calibration_cache({"x": float("nan")}, tmp_path / "c.cache", tensorrt_version="10.3")
    assert not (tmp_path / "c.cache").exists()


def test_retarget_changes_only_the_header(tmp_path) -> None:
    path = write_calibration_cache({"a": 2.0, "b": 0.5}, tmp_path / "c.cache", tensorrt_version="10.3",
                                   algorithm="MinMaxCalibration")
    data = path.read_bytes()
    moved = retarget_calibration_cache(data, "10.7.0")
    assert moved.decode().splitlines()[0] == calibration_cache_header("10.7.0", "MinMaxCalibration")
    assert moved.splitlines()[1:] == data.splitlines()[1:]


# -- engine cache ---------------------------------------------------------------------------------------------------
def test_engine_cache_stores_looks_up_and_rejects_damaged_entries(tmp_path) -> None:
    cache = EngineCache(tmp_path / "engines")
    key = engine_cache_key(onnx_sha256="ab" * 32, tensorrt_version="10.3.0.30", gpu_name="Orin", sm=87,
                           precision="fp16", input_shapes={"input": [1, 3, 512, 512]})
    assert cache.lookup(key) is None
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine bytes")
    stored = cache.store(key, engine, {"gpu": "Orin"})
    assert cache.lookup(key) == stored and stored.read_bytes() == engine.read_bytes()
    assert not list(cache.folder.glob("*.part"))  # written atomically
    stored.write_bytes(b"truncated")
    assert cache.lookup(key) is None  # bytes no longer match the record
