"""Silence the C++ logging of the TFLite toolchain around imports and interpreter creation.

litert-torch's import prints absl/oneDNN banners and torchao's "Failed to load
... CUDA" lines, and every LiteRT interpreter logs "Created TensorFlow Lite
XNNPACK delegate" straight to file descriptor 2, past Python's sys.stderr.
They are harmless (a CPU-only install has no CUDA to load) and drown the CLI's one-line messages, so
fd 2 is pointed at /dev/null for those calls only, unless SFEDGE_VERBOSE is
set.  Python exceptions still propagate with their messages.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["native_stderr_silenced"]


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Redirect fd 2 to /dev/null for the duration (no-op with SFEDGE_VERBOSE=1)."""
    if os.environ.get("SFEDGE_VERBOSE"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. under some test runners)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
