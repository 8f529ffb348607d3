"""Run .tflite files: LiteRT's interpreter (XNNPACK) or, on devices that only have it, tflite-runtime.

Tensors are found through the file's signature (``get_signature_list`` /
``get_signature_runner``), never by the converter's generated tensor names.
Quantized inputs and outputs carry their scale and zero point in the
:class:`TensorSpec`, so the base :class:`Runner`'s ``prepare`` / ``finish``
quantize and dequantize with the file's own parameters.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner
from sfedge.backends.registry import missing_runtime
from sfedge.backends.tflite.quiet import native_stderr_silenced
from sfedge.errors import BackendUnavailable, ConfigError, ExportError

__all__ = ["TFLiteRunner", "INTERPRETERS", "interpreter_class", "guess_layout"]

# Runtime name -> module with an ``Interpreter`` class, in order of preference.
INTERPRETERS = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}


def interpreter_class(runtime: str | None = None) -> tuple[type, str]:
    """The TFLite ``Interpreter`` class to use and its runtime name.

    ``runtime=None`` takes ai-edge-litert (LiteRT, the maintained one) and
    falls back to tflite-runtime, which is what many ARM boards and older
    images have.  Naming a runtime forces it.
    """
    names = [runtime] if runtime else list(INTERPRETERS)
    for name in names:
        if name not in INTERPRETERS:
            raise ConfigError(f"unknown TFLite runtime '{name}'", f"valid runtimes: {', '.join(INTERPRETERS)}")
        try:
            module = importlib.import_module(INTERPRETERS[name])
        except ImportError:
            continue
        return module.Interpreter, name
    raise missing_runtime("tflite", f"no TFLite interpreter is installed ({' or '.join(names)})")


def guess_layout(shape: list[int]) -> str:
    """NHWC when a 4-D image tensor's last dim is the small one (channels), else NCHW."""
    if len(shape) == 4 and shape[-1] <= 4 < min(shape[1], shape[2]):
        return "NHWC"
    return "NCHW"


def _spec(name: str, detail: dict[str, Any], layout: str | None) -> TensorSpec:
    shape = [int(v) for v in detail["shape"]]
    scales = detail.get("quantization_parameters", {}).get("scales", [])
    zeros = detail.get("quantization_parameters", {}).get("zero_points", [])
    dtype = np.dtype(detail["dtype"]).name
    quantized = len(scales) == 1 and np.dtype(dtype).kind in "iu"
    return TensorSpec(
        name=name, shape=shape, dtype=dtype, layout=layout or guess_layout(shape),
        scale=float(scales[0]) if quantized else None, zero_point=int(zeros[0]) if quantized else None,
    )


class TFLiteRunner(Runner):
    """Runs a .tflite file with XNNPACK on ``threads`` CPU threads.

    Options: ``runtime`` ("ai-edge-litert" or "tflite-runtime"; default: the
    first installed), ``signature`` (default: the file's only signature),
    ``layout`` ("NHWC"/"NCHW" of the 4-D image tensors; default: guessed from
    the shape, channels being the small last dim in NHWC).
    """

    backend = "tflite"

    def _load(self) -> None:
        if not self.path.is_file():
            raise ConfigError(f"{self.path} does not exist", "give the path of a .tflite file")
        cls, self.runtime = interpreter_class(self.options.get("runtime"))
        kwargs: dict[str, Any] = {"model_path": str(self.path)}
        if self.threads:
            kwargs["num_threads"] = int(self.threads)
        try:
            with native_stderr_silenced():
                self._interp = cls(**kwargs)
        except ValueError as e:
            raise ExportError(f"{self.runtime} cannot load {self.path.name}: {str(e).splitlines()[0]}",
                              "the file is corrupt or uses ops this runtime lacks; see `sfedge inspect` on it") from e
        signatures = self._interp.get_signature_list()
        if not signatures:
            raise BackendUnavailable(
                f"{self.path.name} has no signature, so its inputs cannot be found by name",
                "re-convert it with sfedge (litert-torch always writes one)",
            )
        key = self.options.get("signature") or ("serving_default" if "serving_default" in signatures else next(iter(signatures)))
        if key not in signatures:
            raise ConfigError(f"{self.path.name} has no signature '{key}'", f"signatures: {', '.join(signatures)}")
        self.signature = key
        self._run = self._interp.get_signature_runner(key)
        layout = self.options.get("layout")
        try:
            self.inputs = [_spec(n, d, layout) for n, d in self._run.get_input_details().items()]
            self.outputs = [_spec(n, d, layout) for n, d in self._run.get_output_details().items()]
            # The first call allocates tensors and applies XNNPACK: do it now, so load time includes it.
            with native_stderr_silenced():
                self._infer(self.random_feed())
        except RuntimeError as e:
            raise BackendUnavailable(
                f"{self.runtime} cannot run {self.path.name}: {str(e).strip().splitlines()[0]}",
                "check the op report: Flex / custom ops need a runtime built with them",
            ) from e

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._run(**feed)
        # The signature runner returns views into interpreter memory that the next call overwrites.
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def _close(self) -> None:
        self._run = None
        self._interp = None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        name = getattr(self, "runtime", None) or interpreter_class(self.options.get("runtime"))[1]
        try:
            v = version(name)
        except PackageNotFoundError:
            v = "unknown"
        return {name: v, "numpy": np.__version__}

    def memory_info(self) -> dict[str, Any]:
        """The interpreters expose no arena or delegate memory figures; only the model file size is known."""
        return {"model_bytes": Path(self.path).stat().st_size}
