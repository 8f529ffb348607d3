"""The `sfedge` CLI end to end, through a real subprocess: bundles, manifests, caching, verify, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST_TARGET = """
name = "{name}"
description = "test target: ONNX Runtime only, small input"
backend = "onnxruntime"
precisions = ["fp32", "int8"]
default_precision = "fp32"
threads = 1
input_size = [64, 64]
[device]
arch = "x86_64"
cores = 1
"""


@pytest.fixture()
def fast_targets(tmp_path: Path) -> Path:
    """Two quick ONNX-Runtime-only targets (64x64) in a folder on $SFEDGE_TARGETS."""
    folder = tmp_path / "targets"
    folder.mkdir()
    for name in ("ort-small", "ort-small-b"):
        (folder / f"{name}.toml").write_text(FAST_TARGET.format(name=name))
    return folder


def _json(stdout: str):
    return json.loads(stdout[stdout.index("{") if stdout.lstrip().startswith("{") else stdout.index("["):])


def test_build_writes_a_complete_bundle_and_reuses_it(sfedge_cli, demo_checkpoints, fast_targets, tmp_path) -> None:
    env = {"SFEDGE_TARGETS": str(fast_targets)}
    ckpt = str(demo_checkpoints["unet-sfconv"])
    rc, out, err = sfedge_cli("build", ckpt, "--target", "ort-small", "-o", "b", "--json", env=env)
    assert rc == 0, err
    summary = _json(out)["bundles"][0]
    assert summary["cached"] is False
    bundle = Path(summary["bundle"]) if Path(summary["bundle"]).is_absolute() else tmp_path / summary["bundle"]
    m = json.loads((bundle / "manifest.json").read_text())
    for key in ("schema", "sfedge_version", "created", "model", "target", "precision", "calibration", "toolchain",
                "artifacts", "reference", "files"):
        assert key in m, key
    assert m["model"]["name"] == "unet-sfconv" and m["model"]["s"] == 0.25 and len(m["model"]["weights_sha256"]) == 64
    assert m["target"]["name"] == "ort-small" and m["precision"] == "fp32"
    assert m["calibration"]["name"] == "fundus-demo" and len(m["calibration"]["sha256"]) == 64
    assert m["toolchain"]["onnxruntime"] and m["toolchain"]["torch"].startswith("2.13")
    art = m["artifacts"][0]
    assert art["backend"] == "onnxruntime" and (bundle / art["path"]).is_file()
    assert art["size"] == (bundle / art["path"]).stat().st_size and len(art["sha256"]) == 64
    assert art["inputs"][0]["shape"] == [1, 3, 64, 64] and art["inputs"][0]["layout"] == "NCHW"
    assert art["parity"]["max_abs"] <= 1e-4
    assert (bundle / "README.md").read_text().startswith("# unet-sfconv for ort-small (fp32)")
    # Unchanged inputs: nothing rebuilt, and it says so.
    rc, out, _ = sfedge_cli("build", ckpt, "--target", "ort-small", "-o", "b", env=env)
    assert rc == 0 and "up to date, nothing rebuilt" in out
    rc, out, _ = sfedge_cli("build", ckpt, "--target", "ort-small", "-o", "b", "--force", "--json", env=env)
    assert rc == 0 and _json(out)["bundles"][0]["cached"] is False
    # verify passes, then names a changed file.
    rc, out, err = sfedge_cli("verify", str(bundle), env=env)
    assert rc == 0 and "PASS" in out, out + err
    with open(bundle / art["path"], "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    rc, out, err = sfedge_cli("verify", str(bundle), env=env)
    assert rc == 1 and f"changed: {art['path']}" in err and "FAIL" in out
    # inspect reads the bundle and the artifact.
    rc, out, _ = sfedge_cli("inspect", str(bundle), "--json", env=env)
    assert rc == 0 and _json(out)["files_changed"] == [art["path"]]


def test_several_targets_in_one_call_and_all_targets_plan(sfedge_cli, demo_checkpoints, fast_targets) -> None:
    env = {"SFEDGE_TARGETS": str(fast_targets)}
    rc, out, err = sfedge_cli("build", str(demo_checkpoints["unet"]), "-t", "ort-small", "-t", "ort-small-b",
                              "-o", "b", "--json", env=env)
    assert rc == 0, err
    assert sorted(b["target"] for b in _json(out)["bundles"]) == ["ort-small", "ort-small-b"]
    rc, out, _ = sfedge_cli("build", "unet", "--all-targets", "--dry-run", "--json", env=env)
    plan = _json(out)
    names = {p["target"] for p in plan}
    assert {"host-cpu", "jetson-orin-nano", "android-arm64", "ort-small"} <= names


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "resnet-9000"], "unknown model 'resnet-9000' (valid models: factorizer, factorizer-sfconv, unet, unet-sfconv)"),
        (["build", "unet", "--target", "jetson-nano-9"], "unknown target 'jetson-nano-9' (valid targets:"),
        (["build", "unet", "--target", "jetson-orin-nano", "--precision", "int4"], "unknown precision for target jetson-orin-nano 'int4' (valid"),
        (["build", "missing.safetensors"], "checkpoint missing.safetensors does not exist"),
        (["verify", "no-such-bundle"], "bundle no-such-bundle does not exist"),
        (["targets", "nope.toml"], "target file nope.toml does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(sfedge_cli, args: list[str], message: str) -> None:
    rc, out, err = sfedge_cli(*args)
    assert rc == (3 if args[0] == "verify" else 2)  # verify: 3 is "not a readable bundle", apart from FAIL (1)
    lines = [line for line in err.splitlines() if line.startswith("sfedge ")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_corrupt_and_mismatched_checkpoints(sfedge_cli, tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    rc, _, err = sfedge_cli("build", str(bad))
    assert rc == 2 and "is corrupt or not a safetensors file" in err
    # A checkpoint whose config says widths the weights do not have.
    from safetensors.torch import load_file, save_file

    from sfedge.checkpoint import read_checkpoint_header, save_checkpoint
    from sfedge.models import create_model

    good = tmp_path / "good.safetensors"
    save_checkpoint(create_model("unet", widths=[8, 16]), good)
    meta = read_checkpoint_header(good)
    meta["config"] = json.dumps({**json.loads(meta["config"]), "widths": [8, 24]})
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(good)), str(edited), metadata=meta)
    rc, _, err = sfedge_cli("build", str(edited))
    assert rc == 2 and "does not match its config" in err


def test_ctrl_c_during_a_build_leaves_no_bundle(demo_checkpoints, fast_targets, tmp_path) -> None:
    env = dict(os.environ, SFEDGE_TARGETS=str(fast_targets))
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "sfedge.cli", "build", str(demo_checkpoints["unet"]), "-t", "ort-small",
                             "-p", "int8", "-o", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and any(p.name.endswith(".part") for p in out.iterdir())):
        time.sleep(0.2)
    assert out.exists(), "the build never started writing"
    time.sleep(1.0)  # well inside the int8 build (export, calibration, mixed precision)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not any((p / "manifest.json").exists() for p in out.iterdir())
    assert not list(out.iterdir()), f"left behind: {list(out.iterdir())}"


def test_full_disk_leaves_no_bundle(demo_checkpoints, fast_targets, tmp_path) -> None:
    import resource

    env = dict(os.environ, SFEDGE_TARGETS=str(fast_targets))

    def small_files() -> None:  # files above 256 KiB fail with EFBIG, as a full disk fails a write
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    p = subprocess.run([sys.executable, "-m", "sfedge.cli", "build", str(demo_checkpoints["unet"]), "-t", "ort-small",
                        "-o", str(tmp_path / "b")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       preexec_fn=small_files, timeout=600)
    assert p.returncode == 2, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("sfedge build: error:")]
    assert line and "check free disk space" in line[0], p.stderr
    assert not list((tmp_path / "b").glob("*")) if (tmp_path / "b").exists() else True


def test_read_only_output_folder_is_a_clear_error(demo_checkpoints, fast_targets, tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    # Root ignores permission bits; the immutable attribute stops root too.
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)]).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: cannot make a read-only folder")
    else:
        ro.chmod(0o555)
    try:
        env = dict(os.environ, SFEDGE_TARGETS=str(fast_targets))
        p = subprocess.run([sys.executable, "-m", "sfedge.cli", "build", str(demo_checkpoints["unet"]), "-t", "ort-small",
                            "-o", str(ro)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 2, p.stderr
        assert f"output folder {ro} is not writable" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
        assert not list(ro.iterdir())
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)])
        else:
            ro.chmod(0o755)


def test_targets_inspect_factorize_train_calibration_verbs(sfedge_cli, demo_checkpoints, tmp_path) -> None:
    rc, out, _ = sfedge_cli("targets", "--json")
    assert rc == 0 and {"host-cpu", "jetson-xavier-nx"} <= {t["name"] for t in _json(out)}
    rc, out, _ = sfedge_cli("inspect", str(demo_checkpoints["unet-sfconv"]), "--json")
    info = _json(out)
    assert rc == 0 and info["name"] == "unet-sfconv" and info["sfconv_layers"]
    assert all(1 <= r["effective_rank"] <= r["rank"] + 1e-6 for r in info["sfconv_layers"])
    rc, out, err = sfedge_cli("factorize", str(demo_checkpoints["unet"]), "--s", "0.5", "-o", "f.safetensors", "--json")
    assert rc == 0, err
    rep = _json(out)
    assert rep["mac_reduction"] > 1 and any(r["rank"] for r in rep["rows"])
    from sfedge.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "f.safetensors")
    assert ck.name == "unet-sfconv" and ck.config["s"] == 0.5
    rc, out, err = sfedge_cli("train", "unet-sfconv", "--config", '{"widths": [8, 16]}', "--steps", "3", "--batch", "2",
                              "-o", "t.safetensors", "--json")
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "t.safetensors").config["widths"] == [8, 16]
    rc, out, _ = sfedge_cli("calibration", "fundus-demo", "--size", "32", "32", "--json")
    assert rc == 0 and _json(out)["holdout"] == [16, 3, 32, 32]
    for verb in ("build", "verify", "targets", "inspect", "factorize", "train", "calibration", "profile", "compare"):
        rc, out, _ = sfedge_cli(verb, "--help")
        assert rc == 0 and "examples:" in out, verb


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
@pytest.mark.parametrize("verb", ["inspect", "profile"])
def test_corrupt_artifacts_are_one_line_errors(sfedge_cli, tmp_path, suffix: str, verb: str) -> None:
    bad = tmp_path / f"model{suffix}"
    bad.write_bytes(bytes(range(256)) * 8)
    args = [verb, str(bad)] + (["--runs", "3", "--processes", "1", "-o", str(tmp_path / "r")] if verb == "profile" else [])
    rc, out, err = sfedge_cli(*args)
    assert rc == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith(f"sfedge {verb}: error:")]
    assert len(lines) == 1 and bad.name in lines[0], err
    assert "Traceback" not in err
