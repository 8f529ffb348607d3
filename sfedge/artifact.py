"""What a stage produces: an artifact file and exactly what it is (numpy only, read on devices).

:class:`Artifact` and :class:`TensorSpec` are the types that travel between
stages, into bundle manifests and back out on the device, so they live below
every stage: the build side writes them, the device side (bundles, verify,
the profiler, every runner) reads them, and neither needs the other's code.
The two conversions at the bottom map the model's float32 NCHW view to an
artifact's own tensors (layout, int8 quantization) and back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.parity import Parity

__all__ = ["TensorSpec", "Artifact", "to_artifact_tensor", "from_artifact_tensor"]


@dataclass
class TensorSpec:
    """One input or output tensor of an artifact, as the device sees it."""

    name: str
    shape: list[int]
    dtype: str  # numpy dtype name: float32, float16, int8, uint8
    layout: str = "NCHW"  # NCHW or NHWC (for 4-D image tensors)
    scale: float | None = None  # quantization: real = scale * (q - zero_point)
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and np.dtype(self.dtype).kind in "iu"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(**d)


@dataclass
class Artifact:
    """A file (or device-ready folder) one stage produced, and exactly what it is.

    ``path`` is the main file; ``files`` lists companions that belong to it
    (calibration cache, trtexec script, op report).  ``parity`` holds the
    agreement with torch measured on the held-out split (None where nothing
    could be run here, e.g. a TensorRT fp16 device folder); ``float_layers``
    the layers kept in float in a mixed-precision build.
    """

    path: Path
    backend: str
    kind: str  # onnx | tflite | engine | device-folder
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    float_layers: list[str] = field(default_factory=list)
    parity: Parity | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    shifted_parity: Parity | None = None  # the same on the shifted (augmented) held-out split, where there is one

    @property
    def companions(self) -> list[Path]:
        """The main file and every companion: what to delete when the artifact is rejected."""
        return [Path(self.path), *map(Path, self.files)]

    def as_dict(self, base: Path | None = None) -> dict[str, Any]:
        """JSON-ready view; paths relative to ``base`` when given (bundles are relocatable)."""

        def rel(p: Path) -> str:
            return str(Path(p).relative_to(base)) if base is not None else str(p)

        return {
            "path": rel(self.path), "backend": self.backend, "kind": self.kind, "precision": self.precision,
            "inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs],
            "float_layers": list(self.float_layers), "parity": self.parity.as_dict() if self.parity else {},
            "files": [rel(f) for f in self.files], "notes": list(self.notes), "meta": dict(self.meta),
            "shifted_parity": self.shifted_parity.as_dict() if self.shifted_parity else {},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> Artifact:
        def ab(p: str) -> Path:
            return (base / p) if base is not None else Path(p)

        return cls(
            path=ab(d["path"]), backend=d["backend"], kind=d["kind"], precision=d["precision"],
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]], outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
            float_layers=list(d.get("float_layers", [])), parity=Parity.from_dict(d.get("parity") or {}),
            files=[ab(f) for f in d.get("files", [])], notes=list(d.get("notes", [])), meta=dict(d.get("meta", {})),
            shifted_parity=Parity.from_dict(d.get("shifted_parity") or {}),
        )


def to_artifact_tensor(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """float32 NCHW -> the artifact's layout and dtype (quantized with its scale and zero point)."""
    x = np.asarray(x, np.float32)
    if spec.layout == "NHWC" and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    dt = np.dtype(spec.dtype)
    if spec.quantized:
        info = np.iinfo(dt)
        q = np.round(x / spec.scale) + (spec.zero_point or 0)
        return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dt))
    return np.ascontiguousarray(x.astype(dt))


def from_artifact_tensor(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The artifact's output tensor -> float32 NCHW (dequantized)."""
    y = np.asarray(y)
    if spec.quantized:
        y = (y.astype(np.float32) - (spec.zero_point or 0)) * spec.scale
    y = y.astype(np.float32)
    if spec.layout == "NHWC" and y.ndim == 4:
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)
