"""Start Python subprocesses that cannot import code from the working folder (a bundle is untrusted input).

``python -m X`` and ``python -c CODE`` put the working folder first on
``sys.path``.  The README tells users to run ``sfedge profile .`` inside a
bundle, so a ``psutil.py`` shipped in a bundle would run in the profiling
worker, and a ``ctypes.py`` in a TensorRT folder in the GPU probe.  Every
Python child sfedge starts therefore gets:

- ``-P`` (Python >= 3.11): the working folder / script folder is not added
  to ``sys.path``, while ``PYTHONPATH`` (a source checkout, the tests) and
  site-packages stay as they are.  ``-I`` would also drop ``PYTHONPATH`` and
  the user's site-packages, where TensorRT or sfedge may legitimately live;
- a neutral working folder: a fresh, empty, private temporary folder, which is
  all that protects Python 3.10 (no ``-P``) and what keeps relative paths
  from meaning anything (callers pass absolute paths).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading

__all__ = ["python_argv", "neutral_cwd", "SAFE_PATH_FLAG"]

SAFE_PATH_FLAG = ["-P"] if sys.version_info >= (3, 11) else []

_lock = threading.Lock()
_neutral: list[str] = []


def python_argv(*args: str, python: str = sys.executable) -> list[str]:
    """``[python, -P, *args]``: the argv of a Python child that ignores its working folder."""
    flag = SAFE_PATH_FLAG if python == sys.executable else []  # another interpreter may be older than 3.11
    return [python, *flag, *args]


def neutral_cwd() -> str:
    """An empty temporary folder owned by this process (removed at exit): the working folder of every child."""
    with _lock:
        if not _neutral or not os.path.isdir(_neutral[-1]):  # created once; again if a temp cleaner removed it
            folder = tempfile.mkdtemp(prefix="sfedge-cwd-")
            atexit.register(shutil.rmtree, folder, True)
            _neutral.append(folder)
        return _neutral[-1]
