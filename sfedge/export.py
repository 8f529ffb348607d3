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
  and output specs, preprocessing), read back with :func:`read_onnx_metadata`;
* run in ONNX Runtime against the torch model: a mismatch beyond the tolerance
  raises :class:`ExportError` and nothing is written.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.base import Artifact, ModelSource, TensorSpec
from sfedge.errors import ExportError
from sfedge.fileio import atomic_path, write_error
from sfedge.targets import Tolerance

__all__ = [
    "export_onnx", "read_onnx_metadata", "set_onnx_metadata", "EXPORT_TOLERANCE", "DEFAULT_OPSET", "METADATA_PREFIX",
]

DEFAULT_OPSET = 17
METADATA_PREFIX = "sfedge."
FORMAT = "sfedge-onnx/1"
# ONNX Runtime fp32 vs torch fp32: the fp32 tolerance every target starts from.
EXPORT_TOLERANCE = Tolerance(max_abs=1e-4, cosine=0.99999)
Progress = Callable[[str, "float | None"], None]


def export_onnx(
    source: ModelSource,
    path: str | Path,
    *,
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
    Returns an fp32 ``onnx`` :class:`Artifact` with its parity filled.
    """
    import onnx

    from sfedge.backends.base import check_parity, measure_parity
    from sfedge.backends.onnxruntime import OnnxRuntimeRunner

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
    _progress(progress, f"exporting {source.name} to ONNX (opset {opset})", 0.0)
    model = _torch_to_onnx(source, shape, opset, dynamo)
    if simplify:
        _progress(progress, "simplifying the ONNX graph", 0.3)
        model = _simplify(model)
    reference = source.reference(check_inputs)
    inputs = [TensorSpec("input", list(shape), "float32", "NCHW")]
    outputs = [TensorSpec("output", [shape[0], *reference.shape[1:]], "float32", "NCHW")]
    _set_metadata(model, source, inputs, outputs, opset)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0][:200]}",
                          "report this model; try --dynamo or another opset") from None
    _progress(progress, "checking the ONNX file against torch in ONNX Runtime", 0.6)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
        with OnnxRuntimeRunner(tmp) as runner:
            parity = measure_parity(runner, check_inputs, reference)
        check_parity(parity, tolerance, f"the ONNX export of {source.name}")
    _progress(progress, "export checked", 1.0)
    return Artifact(
        path=path, backend="onnxruntime", kind="onnx", precision="fp32", inputs=inputs, outputs=outputs,
        parity=parity.as_dict(),
        meta={"opset": opset, "exporter": "dynamo" if dynamo else "torchscript", "simplified": simplify,
              "model": source.name, "weights_sha256": source.weights_sha256},
    )


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The sfedge metadata of an exported ONNX file (JSON values decoded), without loading weights.

    Keys: format, model, config, s, weights_sha256, input, output,
    preprocessing, opset, torch (plus any other ``sfedge.*`` entry).  Empty
    when the file was not written by sfedge.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError
        raise ExportError(f"cannot read ONNX file {path}: {e}", "give an .onnx file written by `sfedge build`") from None
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            try:
                out[prop.key[len(METADATA_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key[len(METADATA_PREFIX):]] = prop.value
    return out


def set_onnx_metadata(model: Any, entries: dict[str, Any]) -> None:
    """Add or replace ``sfedge.<key>`` entries (JSON values) in an ONNX ModelProto's ``metadata_props``.

    Later stages (Q/DQ, fp16) keep the export's metadata and add their own
    (precision, calibration method, layers kept in float) the same way.
    """
    keep = [(p.key, p.value) for p in model.metadata_props if p.key[len(METADATA_PREFIX):] not in entries]
    del model.metadata_props[:]
    for key, value in keep:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value, sort_keys=True)


# -- steps ------------------------------------------------------------------------
def _progress(progress: Progress | None, message: str, fraction: float | None) -> None:
    if progress is not None:
        progress(message, fraction)


def _torch_to_onnx(source: ModelSource, shape: tuple[int, ...], opset: int, dynamo: bool):
    """The torch exporter's ModelProto (weights embedded), via a temporary folder."""
    import tempfile

    import onnx
    import torch

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
            raise write_error(f, e) from None
        except Exception as e:  # the exporters raise many types (TorchExportError, RuntimeError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"torch could not export {source.name} to ONNX opset {opset}: {first[:200]}",
                "try another opset (--opset) or the other exporter (--dynamo)",
            ) from None
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
                          "export with simplify=False (--no-simplify)") from None


def _set_metadata(model, source: ModelSource, inputs: list[TensorSpec], outputs: list[TensorSpec], opset: int) -> None:
    import torch

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
    from sfedge import __version__

    model.producer_version = __version__
