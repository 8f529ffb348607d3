"""The device story: a bundle copied to a machine with only `sfedge[runtime]` (no torch) verifies and profiles.

A fresh venv gets `pip install sfedge[runtime]` from this checkout (numpy, rich,
psutil, onnxruntime, ai-edge-litert, pillow; no torch, no converters); then `sfedge verify`,
`sfedge predict` and `sfedge profile` run there on a bundle built here.  The venv is cached in
.cache/venvs (keyed by pyproject.toml) and sfedge itself is reinstalled each run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGET = """
name = "device-small"
description = "test target: ONNX Runtime and TFLite, small input"
backend = ["onnxruntime", "tflite"]
precisions = ["fp32"]
threads = 1
input_size = [64, 64]
[device]
arch = "x86_64"
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = Path(os.environ.get("SFEDGE_CACHE", ROOT / ".cache")) / "venvs" / f"runtime-{key}"
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "onnxruntime>=1.17,<2",
                        "ai-edge-litert>=1.2,<3", "numpy>=1.24,<3", "rich>=13.7,<16", "psutil>=5.9,<8", "pillow>=10.1,<14"],
                       check=True)
        (venv / ".complete").touch()
    wheel_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
                    str(ROOT)], check=True, cwd=wheel_dir)
    wheel = next(wheel_dir.glob("sfedge-*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--force-reinstall",
                    f"{wheel}[runtime]"], check=True)
    return venv


@pytest.fixture(scope="module")
def device_bundle(demo_checkpoints, tmp_path_factory) -> Path:
    from sfedge.build import build_bundle
    from sfedge.targets import load_target

    d = tmp_path_factory.mktemp("device")
    (d / "device-small.toml").write_text(TARGET)
    result = build_bundle(demo_checkpoints["unet-sfconv"], load_target(d / "device-small.toml"), "fp32", out_dir=d / "bundles")
    copied = d / "copied-to-device"
    shutil.copytree(result.path, copied)  # what `scp -r` to the device does
    return copied


def test_runtime_extra_has_no_torch_and_verifies_a_bundle(runtime_venv: Path, device_bundle: Path, tmp_path: Path) -> None:
    py = runtime_venv / "bin" / "python"
    sfedge = runtime_venv / "bin" / "sfedge"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, env=env)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    p = subprocess.run([str(sfedge), "verify", str(device_bundle)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout and "onnxruntime" in p.stdout and "tflite" in p.stdout
    assert p.stdout.count(" pass ") == 2, p.stdout  # both artifacts re-checked, none skipped
    p = subprocess.run([str(sfedge), "profile", str(device_bundle), "--runs", "5", "--min-seconds", "0",
                        "--warmup-runs", "1", "--warmup-seconds", "0", "-o", str(tmp_path / "report"), "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "report").is_dir() and any((tmp_path / "report").glob("*.json"))


def test_doctor_runs_in_the_runtime_install(runtime_venv: Path, tmp_path: Path) -> None:
    """`sfedge doctor` on a device without torch: says what is missing, finds its self-test model in the wheel."""
    py, sfedge = runtime_venv / "bin" / "python", runtime_venv / "bin" / "sfedge"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SFEDGE_TARGETS")}
    p = subprocess.run([str(sfedge), "doctor", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    if report["status"] != "ok":  # here: no GPU, no TensorRT
        assert report["status"] == "nothing-to-check" and checks["tensorrt"]["status"] == "missing"
    assert checks["polygraphy"]["status"] == "ok" and "ONNX Runtime" in checks["onnxruntime"]["detail"]
    # The wheel has no targets/ folder: the doctor says so and how to point it at one.
    assert report["targets"] == [] and "SFEDGE_TARGETS" in checks["targets"]["hint"]
    p = subprocess.run([str(sfedge), "doctor", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**env, "SFEDGE_TARGETS": str(ROOT / "targets")})
    assert p.returncode == 0 and {t["target"] for t in json.loads(p.stdout)["targets"]} >= {"jetson-orin-nano", "host-cpu"}
    # The self-test model and its reference outputs are package data: ONNX Runtime there reproduces the reference.
    check = ("import numpy as np, onnxruntime as ort; from sfedge.commands import doctor as d; "
             "ref = np.load(d.SELFTEST_REFERENCE); s = ort.InferenceSession(str(d.SELFTEST_ONNX)); "
             "print(float(np.abs(s.run(None, {'input': ref['input']})[0] - ref['logits']).max()))")
    p = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert float(p.stdout) < 1e-4


def test_runtime_extra_predicts_whole_images_and_verifies_them_tiled(runtime_venv: Path, device_bundle: Path,
                                                                     demo_checkpoints, tmp_path: Path) -> None:
    """`sfedge predict` with no torch and no scikit-image: Pillow reads the PNG, each artifact runs tiled; the
    logits are the torch model's tiled logits to fp32 precision, and `verify --whole-image` passes."""
    from PIL import Image

    from sfedge.bundle import load_bundle
    from sfedge.checkpoint import load_checkpoint
    from sfedge.datasets.fundus import load_fundus_image
    from sfedge.models.tiled import tiled_forward
    from sfedge.predict import bundle_preprocessing, bundle_tiling, bundle_window

    image, _ = load_fundus_image(0.5)
    strip = np.ascontiguousarray(image[:300, image.shape[1] // 2 :])
    Image.fromarray(strip).save(tmp_path / "fundus.png")
    b = load_bundle(device_bundle)
    ref = tiled_forward(load_checkpoint(demo_checkpoints["unet-sfconv"]).model,
                        bundle_preprocessing(b).apply(strip)[None], bundle_tiling(b), bundle_window(b))[0]
    sfedge = runtime_venv / "bin" / "sfedge"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for backend in ("onnxruntime", "tflite"):
        out = tmp_path / backend
        p = subprocess.run([str(sfedge), "predict", str(device_bundle), "fundus.png", "-o", str(out), "--backend", backend],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        logits = np.load(out / "fundus.logits.npy")
        assert logits.shape == (1, *strip.shape[:2])
        assert np.abs(logits - ref).max() <= 1e-4 * (ref.max() - ref.min()), backend
        assert np.asarray(Image.open(out / "fundus.mask.png")).shape == strip.shape[:2]
    p = subprocess.run([str(sfedge), "verify", str(device_bundle), "--whole-image"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(" pass ") == 4 and p.stdout.count("whole image") == 2, p.stdout
