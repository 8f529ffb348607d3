"""The TensorRT stage on a machine without TensorRT: trtexec commands per release, GPU probe, engine-cache keys,
and make() writing a complete device-ready folder."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from sfedge.backends.tensorrt.calibration_cache import read_calibration_cache
from sfedge.backends.tensorrt.commands import trtexec_command, write_build_script
from sfedge.backends.tensorrt.engine_cache import engine_cache_key
from sfedge.backends.tensorrt.folder import build_from_folder
from sfedge.backends.tensorrt.gpu import _run_probe, detect_gpu
from sfedge.backends.tensorrt.make import make
from sfedge.backends.tensorrt.rules import lint_onnx
from sfedge.backends.tensorrt.runner import TensorRTRunner
from sfedge.errors import BackendUnavailable, ConfigError
from sfedge.fileio import sha256_file
from sfedge.targets import load_target

GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu")  # desktop driver, Jetson (Tegra) driver


# -- trtexec command per release ------------------------------------------------------------------------------------
def _cmd(version, precision, **kw):
    return trtexec_command("model.onnx", "model.engine", tensorrt_version=version, precision=precision,
                           timing_cache="timing.cache", workspace_mb=512, **kw)


def test_trtexec_workspace_and_build_only_flags_per_release() -> None:
    c85, c10, c11 = _cmd("8.5.2", "fp32"), _cmd("10.3", "fp32"), _cmd("11.0", "fp32")
    assert "--memPoolSize=workspace:512" in c85 and "--buildOnly" in c85  # MiB without suffix; no --skipInference
    assert "--memPoolSize=workspace:512M" in c10 and "--skipInference" in c10
    assert "--memPoolSize=workspace:512M" in c11 and "--skipInference" in c11
    for cmd in (c85, c10, c11):
        assert cmd[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
        assert "--noTF32" in cmd and "--timingCacheFile=timing.cache" in cmd
        assert not any(a.startswith("--workspace") for a in cmd)


def test_trtexec_precision_flags_per_release() -> None:
    # fp16: a builder flag on 8.5 and weakly typed 10.x; TensorRT 11 has no precision flags (fp16 ONNX instead).
    assert "--fp16" in _cmd("8.5.2", "fp16") and "--fp16" in _cmd("10.3", "fp16")
    assert "--stronglyTyped" in _cmd("10.3", "fp16", strongly_typed=True)
    assert "--fp16" not in _cmd("10.3", "fp16", strongly_typed=True)
    # int8 from Q/DQ: --int8 where weakly typed, nothing on 11.
    assert "--int8" in _cmd("8.5.2", "int8", qdq=True) and "--int8" in _cmd("10.3", "int8", qdq=True)
    # implicit int8 with TensorRT's calibration cache: 8.5 and 10.x only.
    for version in ("8.5.2", "10.3"):
        cmd = _cmd(version, "int8", calibration_cache="calibration.cache")
        assert "--int8" in cmd and "--calib=calibration.cache" in cmd
    for precision, kw in (("fp32", {}), ("fp16", {}), ("int8", {"qdq": True})):
        cmd = _cmd("11.0", precision, **kw)
        assert not {"--fp16", "--int8", "--best", "--stronglyTyped"} & set(cmd)
        assert not any(a.startswith("--calib") for a in cmd)
    with pytest.raises(ConfigError, match="no implicit INT8"):
        _cmd("11.0", "int8", calibration_cache="calibration.cache")
    with pytest.raises(ConfigError, match="8.5 has no strongly typed"):
        _cmd("8.5.2", "fp16", strongly_typed=True)
    with pytest.raises(ConfigError, match="Q/DQ ONNX or a calibration cache"):
        _cmd("10.3", "int8")


def test_build_script_runs_the_exact_command_from_its_folder(tmp_path) -> None:
    """The script's plumbing: argv passed verbatim, run from the script's folder, trtexec found on PATH."""
    cmd = _cmd("10.3", "int8", qdq=True)
    script = write_build_script(tmp_path / "dev" / "build_engine.sh", cmd, tensorrt_version="10.3", title="t")
    fake = tmp_path / "bin" / "trtexec"  # records its argv and working folder
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec $*"\n'
                    '[ "$1" = "--help" ] && exit 0\npwd > trtexec.cwd\nprintf "%s\\n" "$@" > trtexec.argv\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dev" / "trtexec.argv").read_text().splitlines() == cmd[1:]
    assert "the target names" not in proc.stderr  # the release matches: no note
    missing = subprocess.run(["sh", str(script)], env={**os.environ, "TRTEXEC": str(tmp_path / "nope")},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "trtexec not found" in missing.stderr


# -- GPU probe, runner, engine-cache key ----------------------------------------------------------------------------
def test_gpu_detection_here_does_not_crash() -> None:
    gpu = detect_gpu(timeout=60)
    if any(Path(p).exists() for p in GPU_DEVICE_NODES):
        assert gpu is not None and gpu.sm >= 50
    else:
        assert gpu is None


def test_probe_survives_a_crashing_or_hanging_child() -> None:
    """What TensorRT does on a GPU-less host (segfault) must come back as "no GPU", not take this process down."""
    assert _run_probe("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 30) is None
    assert _run_probe("import time; time.sleep(30)", 1) is None
    assert _run_probe("print('SFEDGE-GPU-PROBE {\"gpu\": null}')", 30) == {"gpu": None}


@pytest.mark.skipif(any(Path(p).exists() for p in GPU_DEVICE_NODES), reason="a GPU is present")
def test_runner_refuses_without_a_gpu(tmp_path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not loaded")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        TensorRTRunner(engine).load()


def test_engine_cache_key_changes_when_any_input_changes() -> None:
    base = dict(onnx_sha256="ab" * 32, tensorrt_version="10.3.0.30", gpu_name="Orin", sm=87, precision="fp16",
                input_shapes={"input": [1, 3, 512, 512]}, builder_options={"workspace_mb": 1024, "tf32": False})
    key = engine_cache_key(**base)
    assert engine_cache_key(**{**base, "builder_options": {"tf32": False, "workspace_mb": 1024}}) == key
    changes = {
        "onnx_sha256": "cd" * 32, "tensorrt_version": "10.3.0.26", "gpu_name": "Xavier", "sm": 72,
        "precision": "int8", "input_shapes": {"input": [1, 3, 256, 256]},
        "builder_options": {"workspace_mb": 2048, "tf32": False},
    }
    keys = {name: engine_cache_key(**{**base, name: value}) for name, value in changes.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(changes)


# -- make(): the device-ready folder ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_calibration(fundus_calibration):
    """Real fundus crops, centre 64x64 of the 256x256 set."""
    shifted = fundus_calibration.shifted
    return dataclasses.replace(fundus_calibration, calibration=fundus_calibration.calibration[:8, :, 96:160, 96:160],
                               holdout=fundus_calibration.holdout[:4, :, 96:160, 96:160],
                               shifted=None if shifted is None else shifted[:4, :, 96:160, 96:160])


@pytest.fixture(scope="module")
def unet(demo_checkpoints):
    from sfedge.checkpoint import load_checkpoint
    from sfedge.source import ModelSource

    return ModelSource.from_checkpoint(load_checkpoint(demo_checkpoints["unet"]), (64, 64))


@pytest.fixture(scope="module")
def unet_stem(unet):
    """The trained U-Net's first block and its trained 1x1 head: a conv-only model (no ConvTranspose, see
    test_sfedge_qdq_output_passes_the_lint) with meaningful logits, for the int8 folder."""
    from torch import nn

    from sfedge.source import ModelSource

    model = nn.Sequential(unet.model.inc, unet.model.head).eval()
    return ModelSource(model, "unet-stem", {}, unet.weights_sha256, (1, 3, 64, 64))


def _target(tmp_path, name, tensorrt, sm, int8_dice=0.98):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\nbackend = "tensorrt"\nprecisions = ["fp32", "fp16", "int8"]\n'
                    f"input_size = [64, 64]\n[tolerances.int8]\ndice_agreement = {int8_dice}\n"
                    f'[device]\ntensorrt = "{tensorrt}"\nsm = {sm}\n')
    return load_target(path)


def _check_folder(artifact, target, precision, workdir):
    """What every device folder must hold, whatever the release and precision."""
    folder = artifact.path
    assert artifact.kind == "device-folder" and artifact.backend == "tensorrt" and folder.is_dir()
    assert len(artifact.notes) == 1 and "\n" not in artifact.notes[0]
    assert "engine not built here" in artifact.notes[0]
    assert "`sfedge build <this bundle folder>`" in artifact.notes[0] and f"on the {target.name}" in artifact.notes[0]
    plan = json.loads((folder / "build.json").read_text())
    for name in ("model.onnx", plan["onnx"], "build_engine.sh", "BUILD_ON_DEVICE.md", "build.json"):
        assert (folder / name).is_file(), name
    assert os.access(folder / "build_engine.sh", os.X_OK)
    assert subprocess.run(["sh", "-n", str(folder / "build_engine.sh")]).returncode == 0
    assert set(artifact.files) == {p for p in folder.iterdir() if p.is_file()}
    for name, digest in plan["sha256"].items():
        assert sha256_file(folder / name) == digest
    assert plan["trtexec"] == trtexec_command(
        plan["onnx"], "model.engine", tensorrt_version=target.tensorrt_version, precision=precision, qdq=plan["qdq"],
        timing_cache="timing.cache", workspace_mb=plan["workspace_mb"], strongly_typed=plan["strongly_typed"])
    assert " ".join(plan["trtexec"][1:]).replace(" ", " \\\n  ") in (folder / "build_engine.sh").read_text()
    assert lint_onnx(folder / plan["onnx"], tensorrt_version=target.tensorrt_version,
                     strongly_typed=plan["strongly_typed"], precision=precision) == []
    assert [i.name for i in artifact.inputs] == ["input"] and artifact.inputs[0].shape == [1, 3, 64, 64]
    assert not list(Path(workdir).glob(".*.part"))  # nothing half-written beside it
    with pytest.raises(BackendUnavailable, match="cannot build the engine"):
        build_from_folder(folder)  # here: no GPU with TensorRT
    return plan


@pytest.mark.skipif(any(Path(p).exists() for p in GPU_DEVICE_NODES), reason="a GPU is present")
def test_make_fp32_for_jetpack5_writes_a_device_folder(unet, small_calibration, tmp_path) -> None:
    target = load_target("jetson-xavier-nx")  # TensorRT 8.5.2, sm_72
    artifact = make(unet, target, "fp32", small_calibration, tmp_path)
    plan = _check_folder(artifact, target, "fp32", tmp_path)
    assert plan["onnx"] == "model.onnx" and "--buildOnly" in plan["trtexec"]
    assert artifact.parity.max_abs <= 1e-4  # the ONNX stand-in, checked against torch on real crops
    import onnx

    opset = next(o.version for o in onnx.load(str(artifact.path / "model.onnx")).opset_import if o.domain == "")
    assert opset <= 17  # TensorRT 8.5's parser limit


@pytest.mark.skipif(any(Path(p).exists() for p in GPU_DEVICE_NODES), reason="a GPU is present")
def test_make_fp16_for_tensorrt_11_puts_fp16_in_the_onnx(unet, small_calibration, tmp_path) -> None:
    target = _target(tmp_path, "trt11-test", "11.0", 89)
    artifact = make(unet, target, "fp16", small_calibration, tmp_path / "work")
    plan = _check_folder(artifact, target, "fp16", tmp_path / "work")
    assert plan["onnx"] == "model.fp16.onnx" and plan["strongly_typed"] is True
    assert "--fp16" not in plan["trtexec"]
    weakly = make(unet, load_target("jetson-orin-nano"), "fp16", small_calibration, tmp_path / "orin")
    assert json.loads((weakly.path / "build.json").read_text())["onnx"] == "model.onnx"  # 10.3: --fp16 flag


@pytest.mark.skipif(any(Path(p).exists() for p in GPU_DEVICE_NODES), reason="a GPU is present")
@pytest.mark.parametrize("tensorrt, header", [("10.3", "TRT-100300-EntropyCalibration2"),
                                              ("8.5.2", "TRT-8502-EntropyCalibration2")])
def test_make_int8_writes_qdq_onnx_and_calibration_cache(unet_stem, small_calibration, tmp_path, tensorrt,
                                                         header) -> None:
    import onnx

    target = _target(tmp_path, "jetson-int8-test", tensorrt, 87, int8_dice=0.5)
    artifact = make(unet_stem, target, "int8", small_calibration, tmp_path / "work", method="minmax")
    plan = _check_folder(artifact, target, "int8", tmp_path / "work")
    assert plan["onnx"] == "model.qdq.onnx" and plan["qdq"] and "--int8" in plan["trtexec"]
    ops = {n.op_type for n in onnx.load(str(artifact.path / "model.qdq.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    got_header, ranges = read_calibration_cache(artifact.path / "calibration.cache")
    assert got_header == header
    fp32 = onnx.load(str(artifact.path / "model.onnx"))
    inits = {t.name for t in fp32.graph.initializer}
    assert set(ranges) == {t for n in fp32.graph.node for t in [*n.input, *n.output] if t and t not in inits}
    assert "--calib=calibration.cache" in plan["fallback"]["trtexec"]
    assert "# sed -i" in (artifact.path / "build_engine.sh").read_text()  # relabels the cache for the device
    # 64x64 crops may hold too few vessel pixels to judge masks: then the gate judged cosine (fallback_cosine).
    assert artifact.parity.dice_agreement is None or artifact.parity.dice_agreement >= 0.5
    assert artifact.parity.cosine > 0.9


def test_make_refuses_a_target_without_tensorrt(unet, small_calibration, tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not build TensorRT engines"):
        make(unet, load_target("host-cpu"), "fp32", small_calibration, tmp_path)


# -- make() where the GPU matches: probe, builder and runner replaced, everything else real ------------------------
@pytest.mark.slow
def test_make_builds_gates_and_caches_the_engine_when_the_gpu_matches(unet, small_calibration, tmp_path,
                                                                      monkeypatch) -> None:
    import sys

    import sfedge.backends.tensorrt.folder as folder_module
    import sfedge.backends.tensorrt.make as make_module
    from sfedge.backends.tensorrt.engine_cache import EngineCache
    from sfedge.errors import ParityError

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trt_recorder import ORIN, DriftingEngine, EngineAsOnnx, fake_build_engine

    builds = []
    monkeypatch.setattr(make_module, "detect_gpu", lambda: ORIN)
    monkeypatch.setattr(folder_module, "build_engine", lambda *a, **kw: builds.append(a) or fake_build_engine(*a, **kw))
    monkeypatch.setattr(make_module, "TensorRTRunner", EngineAsOnnx)
    target, cache = load_target("jetson-orin-nano"), EngineCache(tmp_path / "engines")  # TensorRT 10.3, sm_87
    engine = make(unet, target, "fp32", small_calibration, tmp_path / "work", engine_cache=cache)
    assert engine.kind == "engine" and engine.path.name == "model.engine" and engine.path.is_file()
    assert target.tolerance("fp32").failures(engine.parity) == [] and engine.parity.samples == 4
    assert engine.meta["tensorrt"] == ORIN.tensorrt and engine.meta["sm"] == 87 and not engine.meta["from_cache"]
    again = build_from_folder(engine.path.parent, engine_cache=cache, gpu=ORIN)  # the same build: from the cache
    assert again.meta["from_cache"] and len(builds) == 1
    monkeypatch.setattr(make_module, "TensorRTRunner", DriftingEngine)  # an engine that disagrees is not kept
    with pytest.raises(ParityError, match="the TensorRT engine model.engine disagrees"):
        make(unet, target, "fp32", small_calibration, tmp_path / "drift", engine_cache=EngineCache(tmp_path / "e2"))
    assert not list((tmp_path / "drift").rglob("model.engine"))
