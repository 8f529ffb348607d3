"""The one table of what each backend is: its files, precisions, layouts, runtime packages and install hint.

Targets validate against it, the CLI and ``inspect`` name files by it,
``verify`` and the profiler find runners through it, and the remote profiler
installs runtimes from it.  Adding a backend (OpenVINO, ExecuTorch, ...) is
one row here plus ``sfedge/backends/<name>/runner.py`` (device side: numpy and
the runtime only) and ``make.py`` (build side).

Numpy-free, torch-free: this module and the runner modules it names are the
device path.  Runner modules are imported by name only when one is needed, so
a device with one runtime installed uses that backend alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfedge.backends.base import Runner
from sfedge.errors import BackendUnavailable, UnknownNameError

__all__ = [
    "BackendInfo", "BACKENDS", "BUILD_BACKENDS", "backend_info", "backend_for_path", "runner_class", "runner_for",
    "missing_runtime",
]


@dataclass(frozen=True)
class BackendInfo:
    """What a backend is, as the rest of sfedge needs to know it."""

    name: str
    runner: str  # "module:Class" of its Runner (device side)
    maker: str | None  # module whose ``make`` builds its artifacts (build side); None: nothing to build
    suffixes: tuple[str, ...]  # artifact files it runs
    precisions: tuple[str, ...]  # precisions it can build
    layouts: tuple[str, ...]  # I/O layouts its artifacts can have
    modules: tuple[str, ...]  # import names of its runtime (any one of them will do)
    packages: tuple[str, ...]  # what pip installs for its runtime on a device (empty: not from pip)
    install: str  # the one-line hint when the runtime is missing

    @property
    def buildable(self) -> bool:
        return self.maker is not None


BACKENDS: dict[str, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo(
            name="onnxruntime", runner="sfedge.backends.onnxruntime.runner:OnnxRuntimeRunner",
            maker="sfedge.backends.onnxruntime.make", suffixes=(".onnx",), precisions=("fp32", "fp16", "int8"),
            layouts=("NCHW",), modules=("onnxruntime",), packages=("onnxruntime>=1.17,<2",),
            install="pip install 'sfedge[runtime]' (or only onnxruntime) on this machine",
        ),
        BackendInfo(
            name="tflite", runner="sfedge.backends.tflite.runner:TFLiteRunner",
            maker="sfedge.backends.tflite.make", suffixes=(".tflite",),
            precisions=("fp32", "fp16", "int8", "int8-dynamic"), layouts=("NHWC", "NCHW"),
            modules=("ai_edge_litert.interpreter", "tflite_runtime.interpreter"), packages=("ai-edge-litert>=1.2,<3",),
            install="pip install 'sfedge[runtime]' (ai-edge-litert), or tflite-runtime on devices without a LiteRT wheel",
        ),
        BackendInfo(
            name="tensorrt", runner="sfedge.backends.tensorrt.runner:TensorRTRunner",
            maker="sfedge.backends.tensorrt.make", suffixes=(".engine", ".plan"), precisions=("fp32", "fp16", "int8"),
            layouts=("NCHW",), modules=("tensorrt",), packages=(),
            install="TensorRT comes with JetPack on a Jetson (sudo apt install python3-libnvinfer); "
                    "on an x86 host with a GPU: pip install 'sfedge[tensorrt]'",
        ),
        BackendInfo(
            name="pytorch", runner="sfedge.backends.pytorch.runner:TorchRunner", maker=None,
            suffixes=(".safetensors",), precisions=("fp32",), layouts=("NCHW",), modules=("torch",),
            packages=("torch==2.13.0",), install="pip install 'sfedge[build]' (torch is the build machine's runtime)",
        ),
    )
}
# The backends a target can name (the torch reference is not a deployment backend).
BUILD_BACKENDS = tuple(name for name, info in BACKENDS.items() if info.buildable)


def backend_info(name: str) -> BackendInfo:
    """The row for ``name`` (UnknownNameError lists the valid names)."""
    if name not in BACKENDS:
        raise UnknownNameError("backend", name, list(BACKENDS))
    return BACKENDS[name]


def backend_for_path(path: str | Path) -> str:
    """Which backend runs the file at ``path``, from its suffix."""
    suffix = Path(path).suffix.lower()
    for info in BACKENDS.values():
        if suffix in info.suffixes:
            return info.name
    known = sorted(s for info in BACKENDS.values() for s in info.suffixes)
    raise BackendUnavailable(f"no backend runs '{suffix or Path(path).name}' files", f"give one of: {', '.join(known)}")


def runner_class(name: str) -> type[Runner]:
    """The Runner class of backend ``name`` (its module imported now; its runtime only when a runner loads)."""
    module, _, cls = backend_info(name).runner.partition(":")
    return getattr(importlib.import_module(module), cls)


def runner_for(path: str | Path, backend: str | None = None, **options: Any) -> Runner:
    """A runner for the artifact at ``path`` (backend from the suffix unless given)."""
    return runner_class(backend or backend_for_path(path))(path, **options)


def missing_runtime(name: str, what: str) -> BackendUnavailable:
    """The error for a backend whose runtime is not importable here: what failed, and the install hint."""
    return BackendUnavailable(what, backend_info(name).install)
