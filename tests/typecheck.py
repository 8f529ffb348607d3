"""The strict type check of sfedge's TensorRT code against TensorRT's real Python API (10.13 stubs).

TensorRT cannot run on the machines sfedge is developed on, so its calls would otherwise be "written against the
docs".  ``tensorrt-stubs`` (MIT) types TensorRT 10.13's whole Python API; with it, mypy reports a misspelt
method or flag (``network.no_such_method()``, ``trt.BuilderFlag.NO_SUCH_FLAG``) and any call removed in 10.

Used by the Makefile (``make setup`` runs ``install``, ``make typecheck`` runs ``check``, and ``make lint`` /
``make test`` run ``make typecheck``) and by tests/test_typecheck.py:

    .venv/bin/python tests/typecheck.py install          # once per pin, into .venv/typecheck/stubs
    .venv/bin/python tests/typecheck.py check [FILE ...] # default: [tool.mypy] files in pyproject.toml

Why the stubs are not installed like other packages (``pip install tensorrt-stubs``):

* their metadata requires ``tensorrt-cu12-bindings`` (TensorRT's real bindings, without the libraries they need),
  so they are installed with ``--no-deps``;
* they ship a ``tensorrt/`` folder holding only ``__init__.pyi``: on ``sys.path`` it makes ``import tensorrt``
  *succeed* as an empty namespace package, and sfedge (and Polygraphy) would take TensorRT for installed.  So they
  go into ``.venv/typecheck/stubs`` (``pip install --target``), which only mypy reads (``MYPYPATH``);
* mypy refuses them as shipped (parse errors stop it before it checks anything), for two defects that
  :func:`repair` fixes in that private copy: 4 parameters named ``in`` (a keyword) in the plugin classes
  (``get_workspace_size``, ``configure_plugin``, ``on_shape_change``), renamed ``in_``, and
  ``INetworkDefinition.add_scale_nd``, whose ``channel_axis`` has no default after defaulted parameters, given
  ``= ...``.  Neither touches an API sfedge calls.  basedpyright reads the stubs unchanged but pulls a Node.js
  runtime (~280 MB) and its strict mode rejects every call into untyped numpy/Polygraphy code; mypy is ~19 MB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)  # the venv running this script (.venv under make)
STAMP = ".installed"

# (what, pattern, replacement, how many times the 10.13.0.35.1 stubs need it)
REPAIRS = (
    ("parameters named `in` (a Python keyword)", re.compile(r"([(,] *)in: "), r"\1in_: ", 4),
    ("add_scale_nd's channel_axis without a default after defaulted parameters",
     re.compile(r"(power: Weights = None, channel_axis: int)\)"), r"\1 = ...)", 1),
)
STUB_FILE = Path("tensorrt_bindings") / "tensorrt.pyi"


class TypecheckSetupError(RuntimeError):
    """The stubs could not be installed or repaired (a new pin whose defects differ, pip failing)."""


def stubs_pin(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The pinned stubs requirement, from [tool.sfedge.typecheck] (so `make setup` re-runs when it changes)."""
    return str(tomllib.loads(pyproject.read_text())["tool"]["sfedge"]["typecheck"]["stubs"])


def stubs_dir(venv: Path = VENV) -> Path:
    """Where the repaired stubs live: inside the venv, off sys.path."""
    return venv / "typecheck" / "stubs"


def repair(folder: Path) -> dict[str, int]:
    """Fix the two defects that stop mypy in the stubs at ``folder`` (in place); what was replaced, how often.

    Refuses (TypecheckSetupError) when a repair does not apply exactly as often as expected: a new stubs release
    has different defects, and silently checking against half-parsed stubs would prove nothing.
    """
    path = folder / STUB_FILE
    text = path.read_text()
    done = {}
    for what, pattern, replacement, expected in REPAIRS:
        text, n = pattern.subn(replacement, text)
        if n != expected:
            raise TypecheckSetupError(f"{path}: expected {expected} x {what}, found {n}; re-check tests/typecheck.py "
                                      "against the new stubs release")
        done[what] = n
    path.write_text(text)
    return done


def install(venv: Path = VENV, pin: str | None = None, python: str = sys.executable) -> Path:
    """Install the pinned stubs into ``stubs_dir(venv)`` without their dependencies, repaired; a no-op when done.

    Written to a temporary folder beside the target and renamed into place, so an interrupted install leaves
    nothing half-repaired behind.
    """
    pin = pin or stubs_pin()
    target = stubs_dir(venv)
    if (target / STAMP).is_file() and (target / STAMP).read_text() == pin:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stubs-", dir=target.parent) as tmp:
        staged = Path(tmp) / "stubs"
        proc = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-compile",
             "--target", str(staged), pin], capture_output=True, text=True)
        if proc.returncode != 0:
            raise TypecheckSetupError(f"pip could not install {pin}: {proc.stderr.strip()[-500:]}")
        repair(staged)
        (staged / STAMP).write_text(pin)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def check(files: list[str] | None = None, *, venv: Path = VENV, cwd: Path = ROOT,
          python: str = sys.executable, config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess[str]:
    """Run mypy (strict, per pyproject.toml's [tool.mypy]) with the repaired stubs; its CompletedProcess.

    ``files`` default to [tool.mypy] files.  The incremental cache lives beside the stubs, so a warm run
    takes about a second.
    """
    stubs = stubs_dir(venv)
    if not (stubs / STAMP).is_file():
        raise TypecheckSetupError(f"no TensorRT stubs in {stubs}: run `make setup` (or python tests/typecheck.py install)")
    env = {**os.environ, "MYPYPATH": str(stubs)}
    cmd = [python, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(stubs.parent / "mypy-cache"),
           *(files or [])]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("install", "check"))
    parser.add_argument("files", nargs="*", help="check: files to check (default: [tool.mypy] files)")
    parser.add_argument("--venv", type=Path, default=VENV, help="the venv whose typecheck/ folder to use (default: this one)")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            print(f"typecheck: {stubs_pin()} in {install(args.venv)}")
            return 0
        proc = check(args.files, venv=args.venv)
    except TypecheckSetupError as e:
        print(f"typecheck: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
