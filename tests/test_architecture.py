"""The import rules hold, and the check would notice if they did not.

``make test`` runs ``lint-imports`` on the package itself; these tests run the
same contracts (pyproject.toml ``[tool.importlinter]``) on a copy of the
package with a rule broken on purpose, so the check is shown to fail when it
should.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install 'sfedge[dev]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    """The package and its pyproject.toml, copied (so a planted import never touches the real tree)."""
    shutil.copytree(ROOT / "sfedge", tmp_path / "sfedge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_the_package_keeps_its_import_rules() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("sfedge.verify", "import torch", "device path never imports torch"),
    ("sfedge.backends.onnxruntime.runner", "from sfedge.quantize import qdq", "device path never imports torch"),
    ("sfedge.nn.sfconv", "from sfedge import build", "Layers"),
    ("sfedge.profile.plots", "from sfedge.profile import report", "No import cycles"),
])
def test_a_broken_rule_fails_the_check(copy: Path, module: str, line: str, contract: str) -> None:
    """Imports inside functions count too: that is where the old cycles hid."""
    _plant(copy, module, line)
    result = _lint(copy)
    assert result.returncode != 0
    broken = result.stdout[result.stdout.index("Broken contracts"):]
    assert contract in broken, broken[:1500]
