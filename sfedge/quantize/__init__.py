"""Quantization stage: calibration ranges, explicit Q/DQ INT8 and fp16 ONNX, per-layer sensitivity, mixed precision.

    fp32 ONNX (sfedge.export) -> compute_ranges -> quantize_qdq / mixed_precision -> int8 Q/DQ ONNX
                              -> to_fp16 -> fp16 ONNX (float32 I/O)

The ranges dict ({onnx tensor name: symmetric amax}) is also what the TensorRT
backend writes its calibration cache from.  onnx and onnxruntime are imported
inside the functions, so importing this package is cheap.
"""

from sfedge.quantize.qdq import (
    FLOAT_SCOPES,
    QUANTIZED_OP_TYPES,
    measure_onnx_parity,
    quantizable_layers,
    quantize_qdq,
    to_fp16,
)
from sfedge.quantize.ranges import METHODS, compute_ranges, entropy_threshold, read_ranges, write_ranges
from sfedge.quantize.sensitivity import (
    LayerSensitivity,
    MixedPrecisionReport,
    layer_role,
    layer_sensitivity,
    mixed_precision,
)

__all__ = [
    "METHODS", "compute_ranges", "write_ranges", "read_ranges", "entropy_threshold",
    "quantize_qdq", "to_fp16", "quantizable_layers", "measure_onnx_parity", "QUANTIZED_OP_TYPES", "FLOAT_SCOPES",
    "LayerSensitivity", "MixedPrecisionReport", "layer_sensitivity", "mixed_precision", "layer_role",
]
