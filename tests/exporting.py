"""The ONNX export as the backends call it: scored against torch in ONNX Runtime (the tests' shorthand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sfedge.artifact import Artifact
from sfedge.backends.onnxruntime.make import ort_scorer
from sfedge.export import export_onnx
from sfedge.source import ModelSource


def export_checked(source: ModelSource, path: str | Path, **kwargs: Any) -> Artifact:
    """``export_onnx`` with ONNX Runtime (CPU, default threads) as its scorer."""
    return export_onnx(source, path, score=ort_scorer(), **kwargs)
