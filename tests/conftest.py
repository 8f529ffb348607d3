"""Shared fixtures: the trained demo checkpoints, calibration sets, temporary targets.

The two demo U-Nets are trained by sfedge's own demo training (``sfedge.demo.DEMO_TRAIN``: 800 steps on fundus
crops, 8.5 CPU minutes here) and cached in .cache/demo (or $SFEDGE_CACHE/demo), so ``make demo`` and the tests
share them.  The tests start from the two checkpoints that training wrote on the build machine
(``tests/data/demo``, 2.4 MB, same file names as the cache): trained weights, so parity is judged on real
masks, and the same weights on every run, so thresholds do not move with a retraining (training on CPU is not
bit-reproducible).  When the demo's model or training config changes, the cache key changes and the tests
train the new models themselves (then refresh tests/data/demo from .cache/demo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Seed the demo cache with the checked-in trained checkpoints (never overwriting a cached file)."""
    import shutil

    from sfedge.demo import demo_cache_dir

    cache = demo_cache_dir()
    for src in sorted((ROOT / "tests" / "data" / "demo").glob("*.safetensors")):
        dst = cache / src.name
        if not dst.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)


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
