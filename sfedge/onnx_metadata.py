"""sfedge's metadata inside ONNX files (``metadata_props`` entries ``sfedge.<key>``, JSON values).

The export writes it (model, config, s, weights hash, input and output specs,
preprocessing, opset); later stages (Q/DQ, fp16) keep it and add their own
(precision, calibration method, layers kept in float); ``inspect`` reads it
back.  Needs only the ``onnx`` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sfedge.errors import ExportError

__all__ = ["METADATA_PREFIX", "read_onnx_metadata", "set_onnx_metadata"]

METADATA_PREFIX = "sfedge."


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
        raise ExportError(f"cannot read ONNX file {path}: {e}", "give an .onnx file written by `sfedge build`") from e
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

