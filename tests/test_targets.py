"""Targets: the built-ins load, and a bad file is an error naming the file, the key and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfedge.errors import ConfigError, UnknownNameError
from sfedge.targets import list_targets, load_target

REQUIRED = {"jetson-orin-nano", "jetson-agx-orin", "jetson-xavier-nx", "android-arm64", "raspberry-pi-5", "host-cpu"}


def test_builtin_targets_load_with_their_device_facts() -> None:
    targets = {t.name: t for t in list_targets()}
    assert REQUIRED <= set(targets)
    assert targets["jetson-xavier-nx"].tensorrt_version.startswith("8.5")
    assert targets["jetson-orin-nano"].device["sm"] == 87
    assert targets["android-arm64"].layout == "NHWC" and targets["android-arm64"].backend == "tflite"
    host = targets["host-cpu"]
    assert set(host.backends) == {"onnxruntime", "tflite"} and host.device["arch"] == "x86_64"
    assert host.tolerance("int8").dice_agreement == 0.98 and host.tolerance("fp32").relative_max_abs == 1e-4


def _write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(body)
    return p


GOOD = """
backend = "tflite"
precisions = ["fp32", "int8"]
input_size = [128, 128]
threads = 2
layout = "NHWC"
[device]
arch = "aarch64"
"""


def test_a_user_target_by_path_or_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, "my-board", GOOD)
    t = load_target(p)
    assert t.name == "my-board" and t.default_precision == "fp32" and t.input_size == (128, 128)
    monkeypatch.setenv("SFEDGE_TARGETS", str(tmp_path))
    assert load_target("my-board").path == str(p)
    assert "my-board" in {t.name for t in list_targets()}


@pytest.mark.parametrize(
    "body, message",
    [
        ("colour = 'red'\n" + GOOD, "unknown key 'colour'.*valid keys"),
        (GOOD.replace('"tflite"', '"coreml"'), "bad value 'coreml' for 'backend'.*valid choices: onnxruntime, tflite, tensorrt"),
        (GOOD.replace('"int8"]', '"int4"]'), "bad value 'int4' for 'precisions'.*valid choices"),
        (GOOD.replace('"NHWC"', '"CHWN"'), "bad value 'CHWN' for 'layout'.*valid choices: NCHW, NHWC"),
        (GOOD.replace("threads = 2", "threads = 0"), "bad value 0 for 'threads'"),
        (GOOD.replace("[128, 128]", "[128]"), "input_size"),
        (GOOD + "[tolerances.int8]\ndice = 0.9\n", "unknown key 'tolerances.int8.dice'.*dice_agreement"),
        (GOOD.replace('arch = "aarch64"', 'sm = 87'), "unknown key 'device.sm' for a cpu target"),
        ('backend = "tensorrt"\nprecisions = ["fp16"]\ninput_size = [64, 64]\n[device]\nsm = 87\n', "needs 'device.tensorrt'"),
        ('backend = "tensorrt"\nprecisions = ["int8-dynamic"]\ninput_size = [64, 64]\n', "not supported by backend"),
        ("backend = [", "not valid TOML"),
    ],
)
def test_bad_target_files_name_the_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    p = _write(tmp_path, "bad", body)
    with pytest.raises(ConfigError, match=message) as info:
        load_target(p)
    assert str(p) in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_target_and_precision_list_the_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown target 'jetson-nano-9'.*valid targets: .*host-cpu"):
        load_target("jetson-nano-9")
    with pytest.raises(UnknownNameError, match="valid precision.*fp16"):
        load_target("jetson-orin-nano").check_precision("int8-dynamic")
