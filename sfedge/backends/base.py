"""The one interface every backend implements: how to *make* an artifact and how to *run* one.

Modelled on Polygraphy's backend split (loader / runner): each backend module
(``onnxruntime``, ``tflite``, ``tensorrt``, ``pytorch``) provides

* ``make(source, target, precision, calibration, workdir) -> Artifact``: turn a
  :class:`ModelSource` (the torch model and what it is) into the backend's
  artifact, checked against torch on the calibration set's held-out split;
* a :class:`Runner` subclass (``load`` / ``infer`` / ``close``), importing its
  runtime lazily, so ``import sfedge.backends`` works on a device with only
  one runtime installed.

Runners speak the artifact's own tensors (``infer``: name -> array in the
artifact's layout and dtype) so the profiler times only the runtime; ``prepare``
and ``finish`` convert from and to the model's float32 NCHW view (layout
transpose, int8 quantization with the tensor's scale and zero point), and
``run`` chains the three for parity checks.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.errors import ParityError
from sfedge.parity import Parity, compare_outputs

__all__ = ["TensorSpec", "Artifact", "ModelSource", "Runner", "measure_parity", "check_parity"]


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
    metrics measured against torch on the held-out split; ``float_layers`` the
    layers kept in float in a mixed-precision build.
    """

    path: Path
    backend: str
    kind: str  # onnx | tflite | engine | device-folder
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    float_layers: list[str] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, base: Path | None = None) -> dict[str, Any]:
        """JSON-ready view; paths relative to ``base`` when given (bundles are relocatable)."""

        def rel(p: Path) -> str:
            return str(Path(p).relative_to(base)) if base is not None else str(p)

        return {
            "path": rel(self.path), "backend": self.backend, "kind": self.kind, "precision": self.precision,
            "inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs],
            "float_layers": list(self.float_layers), "parity": dict(self.parity),
            "files": [rel(f) for f in self.files], "notes": list(self.notes), "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path | None = None) -> Artifact:
        def ab(p: str) -> Path:
            return (base / p) if base is not None else Path(p)

        return cls(
            path=ab(d["path"]), backend=d["backend"], kind=d["kind"], precision=d["precision"],
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]], outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
            float_layers=list(d.get("float_layers", [])), parity=dict(d.get("parity", {})),
            files=[ab(f) for f in d.get("files", [])], notes=list(d.get("notes", [])), meta=dict(d.get("meta", {})),
        )


@dataclass
class ModelSource:
    """The torch model a backend builds from, and what it is (for metadata and caching).

    ``model`` is an eval-mode ``nn.Module`` with contiguous parameters;
    ``input_shape`` is the static NCHW shape the artifact is built for.
    """

    model: Any
    name: str
    config: dict[str, Any]
    weights_sha256: str
    input_shape: tuple[int, int, int, int]
    preprocessing: dict[str, Any] | None = None
    _reference: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """fp32 torch outputs for ``x`` (N, C, H, W), computed one sample at a time and cached by content."""
        import torch

        key = hash(x.tobytes())
        if key not in self._reference:
            with torch.no_grad():
                outs = [self.model(torch.from_numpy(np.ascontiguousarray(x[i : i + 1]))).numpy() for i in range(len(x))]
            self._reference[key] = np.concatenate(outs)
        return self._reference[key]

    @classmethod
    def from_checkpoint(cls, ckpt: Any, input_size: tuple[int, int] | list[int]) -> ModelSource:
        """Source for a loaded :class:`sfedge.checkpoint.Checkpoint` at the target's ``input_size`` (H, W).

        Models with a fixed input size (the Factorizer's positional embedding)
        keep their own size; parameters and buffers are made contiguous (the
        TFLite converter bakes non-contiguous constants wrongly, TOOLCHAIN.md).
        """
        from sfedge.models import input_shape

        model = ckpt.model.eval()
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.contiguous()
        shape = input_shape(ckpt.config, input_size)
        pre = ckpt.preprocessing.as_dict() if ckpt.preprocessing is not None else None
        return cls(model, ckpt.name, dict(ckpt.config), ckpt.weights_sha256, shape, pre)

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.name, "config": self.config, "weights_sha256": self.weights_sha256,
            "input_shape": list(self.input_shape), "preprocessing": self.preprocessing,
        }


class Runner(abc.ABC):
    """Load an artifact, run inference, release it: the same for every runtime.

    Subclasses implement ``load``, ``infer``, ``close`` and fill ``inputs`` and
    ``outputs`` in ``load``.  Use as a context manager.
    """

    backend: str = ""

    def __init__(self, path: str | Path, *, threads: int | None = None, **options: Any) -> None:
        self.path = Path(path)
        self.threads = threads
        self.options = options
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.loaded = False

    @abc.abstractmethod
    def load(self) -> None:
        """Create the runtime session/interpreter/engine (load time is measured around this)."""

    @abc.abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference on tensors already in the artifact's layout and dtype."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime."""

    def memory_info(self) -> dict[str, Any]:
        """Runtime-reported memory (arena, engine, activations) where the runtime exposes it."""
        return {}

    def versions(self) -> dict[str, str]:
        """Versions of the runtime libraries in use (for reports and manifests)."""
        return {}

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
        """float32 NCHW in, float32 NCHW out, one sample at a time (artifacts have batch 1)."""
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
        if not self.loaded:
            self.load()
            self.loaded = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.loaded = False


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


def measure_parity(runner: Runner, inputs: np.ndarray, reference: np.ndarray) -> Parity:
    """Run ``inputs`` through ``runner`` and compare with the torch ``reference`` outputs."""
    return compare_outputs(reference, runner.run(inputs))


def check_parity(parity: Parity, tolerance: Any, what: str) -> None:
    """Raise ParityError naming ``what`` when ``parity`` misses the target's ``tolerance``."""
    failures = tolerance.failures(parity.as_dict())
    if failures:
        raise ParityError(
            f"{what} disagrees with the torch model on the held-out split: {'; '.join(failures)}",
            "loosen the target's [tolerances] only if you accept this, or use another precision",
        )
