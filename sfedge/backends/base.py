"""The one runtime interface every backend implements (device side: numpy only).

Modelled on Polygraphy's ``BaseRunner``: :meth:`Runner.load` is a template
method that calls the backend's :meth:`Runner._load` once and marks the runner
loaded; :meth:`Runner.infer` refuses to run an unloaded runner with a clear
error instead of an ``AttributeError`` from deep inside a runtime.

Runners speak the artifact's own tensors (``infer``: name -> array in the
artifact's layout and dtype) so the profiler times only the runtime;
``prepare`` and ``finish`` convert from and to the model's float32 NCHW view
(layout transpose, int8 quantization with the tensor's scale and zero point),
and ``run`` chains the three for parity checks.

The build side of a backend (``make.py``) is described by
:class:`sfedge.backends.maker.Maker`; what each backend is, by the table in
:mod:`sfedge.backends.registry`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import TensorSpec, from_artifact_tensor, to_artifact_tensor
from sfedge.errors import SfedgeError

__all__ = ["Runner"]


class Runner(abc.ABC):
    """Load an artifact, run inference, release it: the same for every runtime.

    Subclasses implement ``_load`` (filling ``inputs`` and ``outputs``),
    ``_infer`` and ``_close``.  Use as a context manager, or call ``load()``
    and ``close()``.
    """

    backend: str = ""

    def __init__(self, path: str | Path, *, threads: int | None = None, **options: Any) -> None:
        self.path = Path(path)
        self.threads = threads
        self.options = options
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.loaded = False

    # -- the template: public methods call the backend's hooks --------------------------
    def load(self) -> Runner:
        """Create the runtime session/interpreter/engine once (load time is measured around this)."""
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference on tensors already in the artifact's layout and dtype."""
        if not self.loaded:
            raise SfedgeError(f"the {self.backend} runner for {self.path.name} is not loaded",
                              "call load() first, or use the runner as a context manager")
        return self._infer(feed)

    def close(self) -> None:
        """Release the runtime (a closed runner can be loaded again)."""
        if self.loaded:
            self._close()
        self.loaded = False

    @abc.abstractmethod
    def _load(self) -> None:
        """Backend hook: create the runtime object and fill ``inputs`` / ``outputs``."""

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend hook: one inference."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Backend hook: release the runtime object."""

    def memory_info(self) -> dict[str, Any]:
        """Runtime-reported memory (arena, engine, activations) where the runtime exposes it."""
        return {}

    def versions(self) -> dict[str, str]:
        """Versions of the runtime libraries in use (for reports and manifests)."""
        return {}

    def layer_times(self) -> dict[str, Any] | None:
        """Per-node times of every run so far from the runtime's own profiler, when loaded with ``profile_layers``.

        ``{"runs": [ms per run], "nodes": [{"name", "op", "ms": [one per run], "inputs", "outputs"}]}``;
        None for runtimes without a profiler sfedge can read (then per-layer
        times come from per-layer models, :mod:`sfedge.profile.latency_table`).
        """
        return None

    # -- float32 NCHW <-> artifact tensors ------------------------------------
    def prepare(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Model-view input (float32 NCHW) -> feed dict in the artifact's layout and dtype."""
        spec = self.inputs[0]
        return {spec.name: to_artifact_tensor(x, spec)}

    def finish(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """First output -> float32 NCHW (dequantized, transposed back)."""
        spec = self.outputs[0]
        return from_artifact_tensor(outputs[spec.name], spec)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW in, float32 NCHW out, one artifact batch at a time (artifacts have a static batch)."""
        batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1
        outs = [self.finish(self.infer(self.prepare(x[i : i + batch]))) for i in range(0, len(x), batch)]
        return np.concatenate(outs)

    def random_feed(self, seed: int = 0) -> dict[str, np.ndarray]:
        """A feed of the right shapes and dtypes (the profiler's default input)."""
        rng = np.random.default_rng(seed)
        feed = {}
        for spec in self.inputs:
            dt = np.dtype(spec.dtype)
            if dt.kind in "iu":
                info = np.iinfo(dt)
                feed[spec.name] = rng.integers(info.min, info.max, size=spec.shape, endpoint=True).astype(dt)
            else:
                feed[spec.name] = rng.standard_normal(spec.shape).astype(dt)
        return feed

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()
