"""The TFLite runner on devices that only have tflite-runtime (no ai-edge-litert).

The slow test builds a real venv with tflite-runtime 2.14 (which needs
numpy < 2, so it cannot share the main venv) and sfedge without its heavy
dependencies, cached in .cache/venvs across runs, and runs .tflite files
built here through the registry's runner there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfedge.backends.tflite.runner import INTERPRETERS, interpreter_class
from sfedge.errors import BackendUnavailable, ConfigError

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "venvs" / "tflite-runtime-2.14"
REQUIREMENTS = ["tflite-runtime==2.14.0", "numpy<2", "rich", "psutil"]


def test_prefers_litert_and_names_runtimes() -> None:
    pytest.importorskip("ai_edge_litert")
    cls, name = interpreter_class()
    assert name == "ai-edge-litert" and cls.__module__ == "ai_edge_litert.interpreter"
    assert list(INTERPRETERS) == ["ai-edge-litert", "tflite-runtime"]
    with pytest.raises(ConfigError, match="valid runtimes"):
        interpreter_class("tensorflow")


def test_forcing_a_missing_runtime_says_how_to_install() -> None:
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable) as e:
            interpreter_class("tflite-runtime")
        assert "pip install" in str(e.value) and "\n" not in str(e.value)
    else:
        assert interpreter_class("tflite-runtime")[1] == "tflite-runtime"


def _venv_python() -> Path:
    """The cached tflite-runtime venv's python (created on first use; a stamp marks a complete install)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".sfedge-ready"
    want = " ".join(REQUIREMENTS)
    if stamp.is_file() and stamp.read_text() == want and python.exists():
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    run = dict(capture_output=True, text=True, timeout=900)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-e", str(ROOT)],
    ]
    for cmd in steps:
        p = subprocess.run(cmd, **run)
        if p.returncode != 0:
            pytest.skip(f"cannot build the tflite-runtime venv ({' '.join(cmd[2:5])}): {p.stderr.strip()[-300:]}")
    stamp.write_text(want)
    return python


DEVICE_SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np
from sfedge.backends.registry import runner_for

assert importlib.util.find_spec("ai_edge_litert") is None, "this venv must not have ai-edge-litert"
assert importlib.util.find_spec("torch") is None
out_dir, x = Path(sys.argv[1]), np.load(sys.argv[2])
report = {}
for path in sys.argv[3:]:
    with runner_for(path, threads=2) as runner:
        np.save(out_dir / (Path(path).stem + ".npy"), runner.run(x))
        report[Path(path).stem] = {"runtime": runner.runtime, "versions": runner.versions(),
                                   "input": runner.inputs[0].as_dict(), "output": runner.outputs[0].as_dict()}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_runner_falls_back_to_tflite_runtime(tmp_path, demo_sources, fundus_calibration) -> None:
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_quantizer")
    from sfedge.backends.tflite.make import float_tflite
    from sfedge.backends.tflite.quantize import build_recipe, calibrate, write_quantized
    from sfedge.backends.tflite.runner import TFLiteRunner
    from sfedge.parity import compare_outputs

    python = _venv_python()
    src = demo_sources["unet-sfconv"]
    fp32 = float_tflite(src, "NHWC", tmp_path)
    recipe = build_recipe("int8")
    qsvs = calibrate(fp32, fundus_calibration.tflite_samples("args_0", "NHWC"), "serving_default", recipe)
    int8 = write_quantized(fp32, tmp_path / "full-int8.tflite", recipe, qsvs)
    x = fundus_calibration.holdout[:4]
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run([str(python), "-c", DEVICE_SCRIPT, str(tmp_path), str(tmp_path / "x.npy"), str(fp32), str(int8)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    for stem in (fp32.stem, int8.stem):
        assert report[stem]["runtime"] == "tflite-runtime"
        assert report[stem]["versions"]["tflite-runtime"] == "2.14.0"
        assert report[stem]["versions"]["numpy"].startswith("1.")
    assert report[int8.stem]["input"]["dtype"] == "int8" and report[int8.stem]["input"]["scale"] > 0
    assert report[int8.stem]["input"]["layout"] == "NHWC"

    # fp32 on tflite-runtime matches torch as tightly as on LiteRT.
    on_device = np.load(tmp_path / f"{fp32.stem}.npy")
    assert compare_outputs(src.reference(x), on_device).max_abs <= 1e-4
    # int8: the two runtimes' integer kernels round differently, one step here and there, which a few pixels
    # accumulate through 20 layers; on average they agree to within one output step and so do their masks.
    with TFLiteRunner(int8, threads=2) as runner:
        here, step = runner.run(x), runner.outputs[0].scale
    there = np.load(tmp_path / f"{int8.stem}.npy")
    assert np.abs(here - there).mean() <= step
    assert compare_outputs(here, there).dice_agreement > 0.98
    assert compare_outputs(src.reference(x), there).cosine > 0.999
