"""One exception family for sfedge.

The CLI prints ``str(error)`` as a single line and exits non-zero; every
message says what is wrong *and* how to fix it, so each subclass carries an
optional ``hint`` appended to the message.
"""

from __future__ import annotations

# `sfedge build` wrote a bundle without some backend's artifact (its manifest lists the failures).
EXIT_PARTIAL = 4


class SfedgeError(Exception):
    """Base of every error sfedge raises on purpose (exit code 2 in the CLI)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(SfedgeError):
    """A model, target, calibration spec or option is invalid."""


class UnknownNameError(ConfigError):
    """A registry lookup (model, target, precision, backend) failed."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        super().__init__(
            f"unknown {kind} '{name}'",
            f"valid {kind}s: {', '.join(sorted(valid)) or '(none)'}",
        )
        self.kind, self.name, self.valid = kind, name, list(valid)


class LayerError(SfedgeError):
    """A layer cannot be represented (e.g. a grouped conv asked to factorize)."""


class CheckpointError(SfedgeError):
    """A checkpoint is missing, corrupt, or does not match its config."""


class CalibrationError(SfedgeError):
    """A calibration set cannot be read (empty folder, bad image, wrong channels)."""


class ExportError(SfedgeError):
    """An export or conversion failed or produced a model that disagrees with torch."""


class ParityError(ExportError):
    """An artifact's outputs are outside the tolerance for its precision."""


class BackendUnavailable(SfedgeError):
    """An optional runtime or toolchain (TensorRT, a GPU, tflite) is not installed here."""


class BundleError(SfedgeError):
    """A bundle is incomplete or its files no longer match the manifest."""


class MalformedBundleError(BundleError):
    """Not a bundle sfedge can read: no manifest, unreadable or oversized JSON, a manifest that breaks the schema,
    or a path that leaves the bundle.  Exit code 3, so scripts can tell it from a verify FAIL (1)."""

    exit_code = 3


class OutputFolderError(SfedgeError):
    """An output folder (-o) holds something sfedge did not write: refused rather than deleted."""


class RemoteError(SfedgeError):
    """Copying to or running on a remote device failed."""


# What each optional extra brings (pyproject.toml), for the one install hint every missing-package error gives.
EXTRAS = {
    "build": "torch, onnx, onnxruntime, litert-torch, ai-edge-quantizer: the workstation that builds bundles",
    "runtime": "onnxruntime, ai-edge-litert, polygraphy: what a device needs to verify and profile bundles",
    "plots": "matplotlib: the PNG plots of reports",
}


def install_hint(extra: str) -> str:
    """The one-line hint for a missing optional dependency: which extra to install, and what it is for."""
    return f"pip install 'sfedge[{extra}]' ({EXTRAS[extra]})"


class ImageError(SfedgeError):
    """An input image is missing, unreadable, or does not fit the model (channel count)."""
