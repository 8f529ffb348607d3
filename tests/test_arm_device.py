"""The on-device path end to end on aarch64 kernels: an emulated ARM device (QEMU user mode) behind real OpenSSH.

The device is tests/arm_device.py (``make arm-device``; ``make test-arm`` starts it,
runs these tests and stops it).  Everything goes through the real CLI and the system
ssh/scp: ``sfedge build --verify-on`` (parity on the device recorded beside the x86
figure; a difference beyond tolerance fails the build), ``sfedge profile --remote``
with the runtime-only ``--install``, ``sfedge compare``, and fp16 TFLite files whose
reduced-precision metadata makes XNNPACK compute in fp16 on an ARMv8.2 core.

Emulated floating-point SIMD is about a thousand times slower than native, so the
bundles here are tiny (16x16 inputs, 4 held-out crops) except the one real target
bundle (android-arm64 int8 at 256x256, trained demo checkpoint, 2 held-out crops).
Skipped, with the reason, where the machine cannot run the device.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import arm_device
import pytest

pytestmark = [pytest.mark.arm, pytest.mark.slow]

HOST = "root@127.0.0.1"
ARM_TARGET = """
name = "{name}"
description = "test target: an aarch64 board with fp16 arithmetic, small input"
backend = {backends}
precisions = ["fp32", "fp16", "int8"]
default_precision = "fp32"
layout = "NHWC"
threads = 2
input_size = [16, 16]
{tolerances}
[device]
arch = "aarch64"
cores = 2
fp16_arithmetic = true
"""
CALIBRATION = """
name = "{name}"
description = "fundus-demo with few held-out crops: parity checks under emulation"
[source]
builtin = "fundus-demo"
[sampling]
count = 32
holdout = {holdout}
seed = 0
scale = 0.5
"""
FAST_PROFILE = ["--runs", "5", "--min-seconds", "0", "--warmup-runs", "1", "--warmup-seconds", "0", "--processes", "1"]


class Device:
    """How to reach the running device: ssh options for the CLI, and a shell on it for checks."""

    def __init__(self, state: dict) -> None:
        self.state = state
        self.python = state["python"]
        opts = [f"Port={state['port']}", f"IdentityFile={state['key']}", "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null", "IdentitiesOnly=yes"]
        self.ssh_options = [a for o in opts for a in ("--ssh-option", o)]

    def sh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*arm_device.ssh_argv(self.state), command], capture_output=True, text=True,
                              timeout=timeout)

    def put(self, local: Path, remote: str) -> None:
        subprocess.run(["scp", "-q", "-r", "-P", str(self.state["port"]), "-i", self.state["key"], "-o",
                        "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                        str(local), f"{HOST}:{remote}"], check=True, timeout=300)


@pytest.fixture(scope="session")
def device() -> Device:
    """The running emulated device (started here if `make test-arm` did not; skipped where it cannot run)."""
    info = arm_device.status()
    started = False
    if not info["running"]:
        if info["unavailable"]:
            pytest.skip(f"no emulated ARM device: {info['unavailable']}")
        try:
            arm_device.start("raspberry-pi-5", None)
        except arm_device.Unavailable as e:
            pytest.skip(f"no emulated ARM device: {e}")
        started = True
        info = arm_device.status()
    yield Device(info)
    if started:
        arm_device.stop(quiet=True)


@pytest.fixture(scope="session")
def arm_files(tmp_path_factory) -> Path:
    """A folder with the small aarch64 test target and the few-crop calibration specs."""
    d = tmp_path_factory.mktemp("arm-files")
    (d / "targets").mkdir()
    (d / "targets" / "arm-small.toml").write_text(
        ARM_TARGET.format(name="arm-small", backends='["tflite", "onnxruntime"]', tolerances=""))
    (d / "fundus-small.toml").write_text(CALIBRATION.format(name="fundus-small", holdout=4))
    (d / "fundus-two.toml").write_text(CALIBRATION.format(name="fundus-two", holdout=2))
    # The same held-out crops without the shifted split: a gate test that sets max abs between the held-out x86 and
    # aarch64 figures must not be decided by the shifted split's own (larger) x86 max abs first.
    (d / "fundus-small-noshift.toml").write_text(
        CALIBRATION.format(name="fundus-small-noshift", holdout=4) + "[augment]\nshifted = 0\n")
    return d


def sfedge(*args: str, cwd: Path, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "sfedge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _json(out: str):
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="session")
def small_bundles(device, arm_files, demo_checkpoints, tmp_path_factory) -> dict:
    """SFConv bundles built with --verify-on the device and vanilla bundles, fp32 / fp16 / int8, 16x16."""
    out = tmp_path_factory.mktemp("arm-bundles")
    env = {"SFEDGE_TARGETS": str(arm_files / "targets")}
    common = ["--target", "arm-small", "-p", "fp32", "-p", "fp16", "-p", "int8", "-c",
              str(arm_files / "fundus-small.toml"), "-o", str(out), "--json"]
    p = sfedge("build", str(demo_checkpoints["unet-sfconv"]), *common, "--verify-on", HOST, *device.ssh_options,
               "--remote-python", device.python, cwd=out, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    sf = {b["precision"]: b for b in _json(p.stdout)["bundles"]}
    p = sfedge("build", str(demo_checkpoints["unet"]), *common, cwd=out, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    van = {b["precision"]: b for b in _json(p.stdout)["bundles"]}
    return {"sfconv": sf, "vanilla": van, "env": env, "out": out}


def _manifest(summary: dict) -> dict:
    return json.loads((Path(summary["bundle"]) / "manifest.json").read_text())


def test_the_device_is_an_emulated_aarch64_with_the_runtime_only_install(device) -> None:
    from sfedge import __version__

    probe = ("import json, platform, importlib.util as u, sfedge; from sfedge.profile.emulation import emulation_info; "
             "print(json.dumps({'machine': platform.machine(), 'sfedge': sfedge.__version__, "
             "'torch': u.find_spec('torch') is not None, 'runtimes': [m for m in ('onnxruntime', 'ai_edge_litert') "
             "if u.find_spec(m)], **emulation_info()}))")
    p = device.sh(f"{device.python} -c {shlex.quote(probe)}")
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stdout.strip().splitlines()[-1])
    assert facts["machine"] == "aarch64" and facts["sfedge"] == __version__
    assert facts["torch"] is False, "the device has the runtime-only install: no torch"
    assert facts["runtimes"] == ["onnxruntime", "ai_edge_litert"]
    assert facts["emulated"] is True and facts["emulation"]["detected_by"], "emulation is seen from inside"
    assert facts["emulation"]["cpu_model"] == device.state["cpu"]
    assert facts["fp16_arithmetic"] is True, f"{device.state['cpu']} has ARMv8.2 fp16 arithmetic"


def test_verify_on_records_aarch64_parity_beside_x86_for_every_artifact(small_bundles, device) -> None:
    from sfedge.targets import tolerance_for

    for precision, summary in small_bundles["sfconv"].items():
        m = _manifest(summary)
        assert {a["backend"] for a in m["artifacts"]} == {"tflite", "onnxruntime"}
        for art in m["artifacts"]:
            arm = art["parity_on"]["aarch64"]
            assert arm["status"] == "pass" and arm["host"] == HOST and arm["emulated"] is True
            assert arm["emulation"]["cpu_model"] == device.state["cpu"]
            assert art["parity"] and arm["parity"], "the x86 figure and the aarch64 figure, side by side"
            assert not tolerance_for(m["target"]["tolerances"], precision).failures(arm["parity"])
        assert summary["artifacts"][0]["parity_on"]["aarch64"]["status"] == "pass", "the --json summary carries it"
    # Integer kernels agree bit for bit across ISAs; float kernels need not, and fp16 must not (next test).
    int8 = {a["backend"]: a for a in _manifest(small_bundles["sfconv"]["int8"])["artifacts"]}
    assert int8["tflite"]["parity_on"]["aarch64"]["parity"]["dice_agreement"] == int8["tflite"]["parity"]["dice_agreement"]


def test_fp16_metadata_makes_xnnpack_compute_in_fp16_on_an_armv82_core(small_bundles, device, tmp_path) -> None:
    from sfedge.backends.tflite.fp16 import FP16_INFERENCE, reduced_precision, set_reduced_precision
    from sfedge.backends.tflite.runner import TFLiteRunner

    summary = small_bundles["sfconv"]["fp16"]
    bundle = Path(summary["bundle"])
    art = next(a for a in _manifest(summary)["artifacts"] if a["backend"] == "tflite")
    marked = bundle / art["path"]
    assert reduced_precision(marked) == FP16_INFERENCE, "arm-small has fp16 arithmetic: the file says so"
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(marked.read_bytes())
    set_reduced_precision(plain, None)
    x = __import__("numpy").load(bundle / "holdout_inputs.npy")
    with TFLiteRunner(marked, threads=1) as a, TFLiteRunner(plain, threads=1) as b:
        assert float(abs(a.run(x) - b.run(x)).max()) == 0.0, "x86: no fp16 arithmetic, the metadata is inert"
    device.sh("rm -rf /tmp/fp16check && mkdir -p /tmp/fp16check")
    for f in (marked, plain, bundle / "holdout_inputs.npy"):
        device.put(f, f"/tmp/fp16check/{'marked.tflite' if f == marked else f.name}")
    script = ("import numpy as np; from sfedge.backends.tflite.runner import TFLiteRunner as R; "
              "x = np.load('/tmp/fp16check/holdout_inputs.npy'); "
              "a = R('/tmp/fp16check/marked.tflite', threads=1); a.load(); b = R('/tmp/fp16check/plain.tflite', threads=1); "
              "b.load(); print(float(abs(a.run(x) - b.run(x)).max()))")
    diffs = {}
    for cpu in (device.state["cpu"], "cortex-a72"):  # an ARMv8.2 core with fp16 arithmetic, and an ARMv8.0 one
        p = device.sh(f"QEMU_CPU={cpu} {device.python} -c {shlex.quote(script)}")
        assert p.returncode == 0, p.stderr[-2000:]
        diffs[cpu] = float(p.stdout.strip().splitlines()[-1])
    assert diffs[device.state["cpu"]] > 0.0, "with the metadata XNNPACK computes in fp16 on the fp16 core"
    assert diffs["cortex-a72"] == 0.0, "without fp16 arithmetic the metadata changes nothing"
    x86, arm = art["parity"], art["parity_on"]["aarch64"]["parity"]
    assert arm["max_abs"] > x86["max_abs"], "fp16 arithmetic adds error on top of the fp16 weights"


def test_the_fp16_tolerance_gates_the_difference_on_arm(small_bundles, device, demo_checkpoints, arm_files, tmp_path) -> None:
    """A tolerance that the x86 figure meets and the aarch64 one does not fails the build and leaves no bundle."""
    art = next(a for a in _manifest(small_bundles["sfconv"]["fp16"])["artifacts"] if a["backend"] == "tflite")
    x86, arm = art["parity"]["max_abs"], art["parity_on"]["aarch64"]["parity"]["max_abs"]
    assert arm > x86
    between = math.sqrt(x86 * arm)
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "arm-gate.toml").write_text(ARM_TARGET.format(
        name="arm-gate", backends='"tflite"', tolerances=f"[tolerances.fp16]\nmax_abs = {between!r}\n"))
    out = tmp_path / "out"
    p = sfedge("build", str(demo_checkpoints["unet-sfconv"]), "--target", "arm-gate", "-p", "fp16", "-c",
               str(arm_files / "fundus-small-noshift.toml"), "-o", str(out), "--verify-on", HOST, *device.ssh_options,
               "--remote-python", device.python, cwd=tmp_path, env={"SFEDGE_TARGETS": str(targets)})
    assert p.returncode != 0
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("sfedge build: error:") and "aarch64 (emulated)" in line and "max abs" in line, line
    assert not out.exists() or not list(out.iterdir()), "a bundle that fails on the device is never renamed into place"


def test_profile_on_the_device_with_install_marks_emulated_latency(small_bundles, device, tmp_path) -> None:
    """--install into a venv with only pip (the runtime-only install over SSH), every precision and backend paired,
    the report back with emulation marked, and compare merging it with an x86 report."""
    venv = f"/root/venv-install-{os.getpid()}"
    assert device.sh(f"rm -rf {venv} && cp -a {device.state['bare_python'].rsplit('/bin/', 1)[0]} {venv}").returncode == 0
    sf, van = small_bundles["sfconv"], small_bundles["vanilla"]
    precisions = ("fp32", "fp16", "int8")
    args = [*(sf[p]["bundle"] for p in precisions)]
    for p in precisions:
        args += ["--pair", van[p]["bundle"]]
    out = tmp_path / "remote"
    p = sfedge("profile", *args, "--remote", HOST, *device.ssh_options, "--remote-python", f"{venv}/bin/python",
               "--install", "-o", str(out), *FAST_PROFILE, "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    result = _json(p.stdout)
    installed = result["installed"][HOST]
    assert installed[0].startswith("sfedge-") and installed[0].endswith(".whl")
    assert {r.split(">")[0] for r in installed[1:]} == {"onnxruntime", "ai-edge-litert"}, "only the runtimes needed"
    check = device.sh(f"{venv}/bin/python -c 'import torch'")
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr
    report_dir = Path(result["reports"][HOST])
    report = json.loads((report_dir / "report.json").read_text())
    assert report["host"]["machine"] == "aarch64" and report["host"]["emulated"] is True
    assert report["host"]["emulation"]["detected_by"] and report["host"]["ssh"] == HOST
    pairs = {(r["backend"], r["precision"]) for r in result["pairs"]}
    assert pairs == {(b, p) for b in ("tflite", "onnxruntime") for p in precisions}
    assert all(r["emulated"] for r in result["pairs"] + result["summary"])
    md = (report_dir / "report.md").read_text()
    assert "## Latency (ms) (emulated, not device speed)" in md and "never the device's speed" in md
    # The same fp32 pair on this x86 machine, then both reports merged: only the device's column is marked.
    local = tmp_path / "x86"
    p = sfedge("profile", sf["fp32"]["bundle"], "--pair", van["fp32"]["bundle"], "--backend", "tflite", "--device",
               "x86-host", "-o", str(local), *FAST_PROFILE, "--no-plots", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = sfedge("compare", str(report_dir), str(local), "-o", str(tmp_path / "cmp"), "--no-plots", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    cmp = (tmp_path / "cmp" / "compare.md").read_text()
    header = next(line for line in cmp.splitlines() if line.startswith("| measured"))
    assert "127.0.0.1 (emulated, not device speed)" in header and "x86-host |" in header
    assert "x86-host (emulated" not in header


def test_real_target_bundle_from_the_trained_checkpoint_verifies_on_aarch64(device, demo_checkpoints, arm_files,
                                                                            tmp_path) -> None:
    """android-arm64 int8 (its default precision) at 256x256 from the trained SFConv demo model."""
    out = tmp_path / "bundles"
    p = sfedge("build", str(demo_checkpoints["unet-sfconv"]), "--target", "android-arm64", "-c",
               str(arm_files / "fundus-two.toml"), "-o", str(out), "--verify-on", HOST, *device.ssh_options,
               "--remote-python", device.python, "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    [summary] = _json(p.stdout)["bundles"]
    m = _manifest(summary)
    assert m["target"]["name"] == "android-arm64" and m["precision"] == "int8"
    assert m["model"]["metrics"].get("untrained") is not True
    [art] = m["artifacts"]
    arm = art["parity_on"]["aarch64"]
    assert art["backend"] == "tflite" and arm["status"] == "pass" and arm["parity"]["samples"] == 2
    assert arm["parity"]["dice_agreement"] >= m["target"]["tolerances"]["int8"]["dice_agreement"]
