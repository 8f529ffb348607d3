"""Shared fixtures: the trained demo checkpoints, calibration sets, temporary targets.

Training the two demo U-Nets takes a few CPU minutes the first time; the
checkpoints are cached in .cache/demo (or $SFEDGE_CACHE/demo), so ``make demo``
and the tests share them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def demo_checkpoints() -> dict[str, Path]:
    """{"unet": path, "unet-sfconv": path}: trained demo models (trained once, then cached)."""
    from sfedge.demo import demo_checkpoints as get

    return get()


@pytest.fixture(scope="session")
def demo_sources(demo_checkpoints):
    """ModelSource per demo model at 256x256 (the host-cpu input size)."""
    from sfedge.checkpoint import load_checkpoint
    from sfedge.source import ModelSource

    return {name: ModelSource.from_checkpoint(load_checkpoint(p), (256, 256)) for name, p in demo_checkpoints.items()}


@pytest.fixture(scope="session")
def fundus_calibration():
    """The built-in fundus-demo calibration set at 256x256."""
    from sfedge.calibration import load_calibration

    return load_calibration("fundus-demo", (256, 256))


@pytest.fixture(scope="session")
def host_target():
    from sfedge.targets import load_target

    return load_target("host-cpu")


@pytest.fixture()
def sfedge_cli(tmp_path):
    """Run the real `sfedge` CLI in a subprocess: returns (returncode, stdout, stderr)."""
    import subprocess

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900):
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.run(
            [sys.executable, "-m", "sfedge.cli", *args], cwd=cwd or tmp_path, env=e,
            capture_output=True, text=True, timeout=timeout,
        )
        return p.returncode, p.stdout, p.stderr

    return run
