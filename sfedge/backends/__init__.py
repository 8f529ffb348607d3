"""Backends, one module each, behind the interface in :mod:`sfedge.backends.base`.

Modules are imported lazily by name, so a device with only ONNX Runtime (or
only tflite-runtime, or only TensorRT) can use its own backend.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from sfedge.errors import BackendUnavailable, UnknownNameError

__all__ = ["BACKEND_MODULES", "backend_module", "runner_for", "backend_for_path"]

BACKEND_MODULES = {
    "pytorch": "sfedge.backends.pytorch",
    "onnxruntime": "sfedge.backends.onnxruntime",
    "tflite": "sfedge.backends.tflite",
    "tensorrt": "sfedge.backends.tensorrt",
}
_SUFFIXES = {
    ".safetensors": "pytorch",
    ".onnx": "onnxruntime",
    ".tflite": "tflite",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
}


def backend_module(name: str) -> ModuleType:
    """The backend module ``name`` (imported now; its runtime is imported when used)."""
    if name not in BACKEND_MODULES:
        raise UnknownNameError("backend", name, list(BACKEND_MODULES))
    return importlib.import_module(BACKEND_MODULES[name])


def backend_for_path(path: str | Path) -> str:
    """Which backend runs the file at ``path``, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise BackendUnavailable(
            f"no backend runs '{suffix or Path(path).name}' files",
            f"give one of: {', '.join(sorted(_SUFFIXES))}",
        )
    return _SUFFIXES[suffix]


def runner_for(path: str | Path, backend: str | None = None, **options: Any):  # -> Runner
    """A runner for the artifact at ``path`` (backend from the suffix unless given)."""
    mod = backend_module(backend or backend_for_path(path))
    return mod.RUNNER(path, **options)
