"""Export: torch model -> one self-contained, simplified, checked ONNX file.

The first stage after the model (model -> **export** -> quantize -> convert).
What comes out is what every ONNX consumer downstream builds from (ONNX
Runtime, the Q/DQ quantizer, TensorRT), so it is checked here once:

* one file (weights embedded, no ``.onnx.data``), static input shape from the
  :class:`ModelSource`, input ``input`` and output ``output``;
* opset 17 by default, from the TorchScript exporter (``dynamo=False``): it
  emits opset 17 natively (the dynamo exporter builds 18+ and down-converts),
  names nodes by module path (``/inc/inc.0/conv_a/Conv``), which is how
  mixed-precision reports name the layers kept in float, and exports both model
  families (U-Net, Factorizer) with at most 5-D tensors; ``dynamo=True`` is
  available;
* simplified with onnxslim (constant folding, dead nodes; outputs unchanged);
* sfedge metadata in ``metadata_props`` (model, config, s, weights hash, input
  and output specs, preprocessing; :mod:`sfedge.onnx_metadata`);
* scored against the torch model by the caller's runtime: a miss of the tolerance
  raises :class:`ExportError` and nothing is written.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from sfedge import __version__
from sfedge.artifact import Artifact, TensorSpec
from sfedge.errors import ExportError
from sfedge.fileio import atomic_path, write_error
from sfedge.onnx_metadata import set_onnx_metadata
from sfedge.parity import DEFAULT_TOLERANCES, Scorer, Tolerance, gate
from sfedge.progress import Progress, tell
from sfedge.source import ModelSource

__all__ = ["export_onnx", "EXPORT_TOLERANCE", "DEFAULT_OPSET", "FORMAT"]

DEFAULT_OPSET = 17
FORMAT = "sfedge-onnx/1"
# ONNX Runtime fp32 vs torch fp32: the fp32 tolerance every target starts from.
EXPORT_TOLERANCE = DEFAULT_TOLERANCES["fp32"]


def export_onnx(
    source: ModelSource,
    path: str | Path,
    *,
    score: Scorer,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    tolerance: Tolerance | None = None,
    check_inputs: np.ndarray | None = None,
    progress: Progress | None = None,
    dynamo: bool = False,
) -> Artifact:
    """Export ``source`` to the ONNX file ``path`` and prove it matches torch, or write nothing.

    ``check_inputs`` (N, C, H, W) float32 are the samples compared in ONNX
    Runtime (default: two seeded standard-normal inputs, the scale of
    normalized images); pass the calibration set's held-out split for parity on
    real images.  ``tolerance`` defaults to :data:`EXPORT_TOLERANCE`.
    ``score`` runs an ONNX file and compares it with the reference (the
    caller's runtime, ONNX Runtime in practice; this stage imports none).
    Returns an fp32 ``onnx`` :class:`Artifact` with its parity filled.
    """
    path = Path(path)
    tolerance = tolerance or EXPORT_TOLERANCE
    shape = tuple(int(d) for d in source.input_shape)
    if check_inputs is None:
        check_inputs = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    check_inputs = np.ascontiguousarray(check_inputs, np.float32)
    if check_inputs.shape[1:] != shape[1:]:
        raise ExportError(
            f"check inputs have shape {check_inputs.shape[1:]} per sample but the model input is {shape[1:]}",
            "load the calibration set at the model's input size",
        )
    tell(progress, f"exporting {source.name} to ONNX (opset {opset})", 0.0)
    model = _torch_to_onnx(source, shape, opset, dynamo)
    if simplify:
        tell(progress, "simplifying the ONNX graph", 0.3)
        model = _simplify(model)
    reference = source.reference(check_inputs)
    inputs = [TensorSpec("input", list(shape), "float32", "NCHW")]
    outputs = [TensorSpec("output", [shape[0], *reference.shape[1:]], "float32", "NCHW")]
    _set_metadata(model, source, inputs, outputs, opset)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0][:200]}",
                          "report this model; try --dynamo or another opset") from e
    tell(progress, "checking the ONNX file against torch", 0.6)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
        parity = gate(score(tmp, check_inputs, reference), tolerance, f"the ONNX export of {source.name}")
    tell(progress, "export checked", 1.0)
    return Artifact(
        path=path, backend="onnxruntime", kind="onnx", precision="fp32", inputs=inputs, outputs=outputs,
        parity=parity,
        meta={"opset": opset, "exporter": "dynamo" if dynamo else "torchscript", "simplified": simplify,
              "model": source.name, "weights_sha256": source.weights_sha256},
    )


# -- steps ------------------------------------------------------------------------
def _torch_to_onnx(source: ModelSource, shape: tuple[int, ...], opset: int, dynamo: bool):
    """The torch exporter's ModelProto (weights embedded), via a temporary folder."""
    model = source.model.eval()
    dummy = torch.zeros(shape, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="sfedge-export-") as tmp:
        f = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                kwargs: dict[str, Any] = {"external_data": False, "optimize": True, "verbose": False} if dynamo else {}
                torch.onnx.export(
                    model, (dummy,), str(f), dynamo=dynamo, opset_version=opset,
                    input_names=["input"], output_names=["output"], do_constant_folding=True, **kwargs,
                )
        except OSError as e:  # disk full, read-only temp folder: not an exporter problem
            raise write_error(f, e) from e
        except Exception as e:  # the exporters raise many types (TorchExportError, RuntimeError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"torch could not export {source.name} to ONNX opset {opset}: {first[:200]}",
                "try another opset (--opset) or the other exporter (--dynamo)",
            ) from e
        proto = onnx.load(str(f))  # pulls in external data if the exporter wrote any
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"the exporter wrote opset {got}, not the requested {opset}",
                          f"use opset {got} or the TorchScript exporter (dynamo=False)")
    return proto


def _simplify(model):
    import onnxslim

    try:
        return onnxslim.slim(model)
    except Exception as e:  # onnxslim raises assorted errors on graphs it cannot handle
        raise ExportError(f"onnxslim could not simplify the graph: {str(e).splitlines()[0][:200]}",
                          "export with simplify=False (--no-simplify)") from e


def _set_metadata(model, source: ModelSource, inputs: list[TensorSpec], outputs: list[TensorSpec], opset: int) -> None:
    meta = {
        "format": FORMAT,
        "model": source.name,
        "config": source.config,
        "s": source.config.get("s") if source.config.get("conv") == "sfconv" else None,  # None: dense convs
        "weights_sha256": source.weights_sha256,
        "input": inputs[0].as_dict(),
        "output": outputs[0].as_dict(),
        "preprocessing": source.preprocessing,
        "opset": opset,
        "precision": "fp32",
        "torch": torch.__version__,
    }
    del model.metadata_props[:]
    set_onnx_metadata(model, meta)
    model.producer_name = "sfedge"
    model.producer_version = __version__
