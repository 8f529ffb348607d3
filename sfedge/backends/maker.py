"""The build side of a backend: one typed signature every ``sfedge/backends/<name>/make.py`` implements.

Why a protocol and not a base class: a backend's build side is one function
(Polygraphy's loaders are callables too); the protocol is what ``build``
calls and what a type checker holds each ``make`` to.  The registry row
(:mod:`sfedge.backends.registry`) names the module; :func:`maker` imports it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from sfedge.artifact import Artifact
from sfedge.backends.int8 import Int8Options
from sfedge.backends.registry import backend_info
from sfedge.calibration import CalibrationSet
from sfedge.errors import ConfigError
from sfedge.progress import Progress
from sfedge.source import ModelSource
from sfedge.targets import Target

__all__ = ["Maker", "maker"]


class Maker(Protocol):
    """Turn ``source`` into the backend's artifact for ``target`` at ``precision`` inside ``workdir``.

    The artifact's parity against torch on ``calibration.holdout`` is measured
    and gated (:func:`sfedge.parity.gate`) before it is returned; a miss
    raises ParityError and leaves nothing of the artifact behind.  ``int8``
    says how int8 quantizes (QAT, calibration methods, float I/O, costs);
    a backend without int8 ignores it.
    """

    def __call__(self, source: ModelSource, target: Target, precision: str, calibration: CalibrationSet,
                 workdir: Path, *, progress: Progress | None = None, int8: Int8Options | None = None) -> Artifact: ...


def maker(name: str) -> Maker:
    """The ``make`` function of backend ``name`` (its build-side module is imported now)."""
    info = backend_info(name)
    if info.maker is None:
        raise ConfigError(f"backend '{name}' builds no artifacts", "pick onnxruntime, tflite or tensorrt")
    make: Maker = importlib.import_module(info.maker).make
    return make
