"""fp16 that is fp16 on ARM: TFLite's reduced-precision metadata, which lets XNNPACK compute in half precision.

XNNPACK runs a float .tflite in fp16 only when two things hold: the CPU has
ARMv8.2 fp16 arithmetic (FEAT_FP16: ``fphp`` + ``asimdhp`` in AT_HWCAP), and
the model carries the metadata entry ``reduced_precision_support`` whose
value says fp16 inference with fp16 accumulation (``fp16accfp16``; the
delegate reads it with ``SetMaskFromReducedPrecisionMetadata`` and sets
``XNN_FLAG_HINT_FP16_INFERENCE``; tensorflow/lite/tools/optimize/
reduced_precision_support.h).  Without it an fp16-weight model is up-cast and
computed in fp32 on every CPU, ARM included.

TensorFlow's converter writes the entry for
``target_spec._experimental_supported_accumulation_type = tf.float16``; the
LiteRT converter behind litert-torch has no such option (its ConverterFlags
carry no accumulation type), and ai-edge-quantizer's float casting writes
none either.  So sfedge writes the one metadata entry itself, with the
flatbuffer object API that ships in ai-edge-litert (``ai_edge_litert.tools.
flatbuffer_utils``), and only for targets whose ``device.fp16_arithmetic``
is true.  On x86 the entry changes nothing (no fp16 arithmetic there), so the
build machine's parity check still measures fp32 arithmetic on fp16 weights;
the ARM figure comes from ``sfedge build --verify-on`` or ``sfedge verify``
on the device.
"""

from __future__ import annotations

import os
from pathlib import Path

from sfedge.backends.registry import missing_runtime
from sfedge.fileio import atomic_path

__all__ = ["REDUCED_PRECISION_KEY", "FP16_INFERENCE", "FP16_NOTE", "mark_fp16_inference", "set_reduced_precision",
           "reduced_precision"]

REDUCED_PRECISION_KEY = "reduced_precision_support"
FP16_INFERENCE = "fp16accfp16"  # fp16 inference, fp16 accumulation: what XNNPACK requires to switch to fp16
FP16_NOTE = ("carries TFLite's reduced-precision metadata (reduced_precision_support = fp16accfp16): XNNPACK "
             "computes it in fp16 on ARMv8.2+ cores with fp16 arithmetic, in fp32 elsewhere (x86 included)")


def _flatbuffer_utils():
    try:
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError as err:
        raise missing_runtime("tflite", "ai-edge-litert's flatbuffer tools are not installed, so TFLite metadata "
                              "cannot be read or written here") from err
    return flatbuffer_utils


def reduced_precision(path: str | os.PathLike[str]) -> str | None:
    """The file's ``reduced_precision_support`` metadata value, or None when it has none."""
    fb = _flatbuffer_utils()
    model = fb.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == REDUCED_PRECISION_KEY:
            return bytes(bytearray(model.buffers[entry.buffer].data)).decode()
    return None


def mark_fp16_inference(path: str | os.PathLike[str]) -> Path:
    """Rewrite ``path`` in place so XNNPACK may compute it in fp16 (``reduced_precision_support = fp16accfp16``)."""
    return set_reduced_precision(path, FP16_INFERENCE)


def set_reduced_precision(path: str | os.PathLike[str], value: str | None) -> Path:
    """Rewrite ``path`` in place with ``reduced_precision_support = value`` (None: without the entry).

    Only the metadata table and one buffer change; operators, tensors,
    weights and signatures are written back as read.  Atomic: the file is
    replaced only once the new one is complete.
    """
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    fb = _flatbuffer_utils()
    path = Path(path)
    model = fb.read_model_from_bytearray(bytearray(path.read_bytes()))
    kept = [m for m in (model.metadata or [])
            if (m.name.decode() if isinstance(m.name, bytes) else m.name) != REDUCED_PRECISION_KEY]
    if value is not None:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(value.encode(), dtype=np.uint8).copy()
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = REDUCED_PRECISION_KEY, len(model.buffers) - 1
        kept.append(entry)
    model.metadata = kept or None
    data = fb.convert_object_to_bytearray(model)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(bytes(data))
    return path
