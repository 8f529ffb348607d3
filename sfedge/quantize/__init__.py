"""Quantization stage: calibration ranges, explicit Q/DQ INT8 and fp16 ONNX, and the one mixed-precision search.

    fp32 ONNX (sfedge.export) -> compute_ranges -> quantize_qdq / mixed_precision -> int8 Q/DQ ONNX
                              -> to_fp16 -> fp16 ONNX (float32 I/O)

The ranges dict ({onnx tensor name: symmetric amax}) is also what the TensorRT
backend writes its calibration cache from.  :mod:`.search` is the numpy-only
search loop every backend's quantizer plugs into (:mod:`.mixed` for Q/DQ
ONNX, :mod:`sfedge.backends.tflite.quantize` for TFLite).  onnx and
onnxruntime are imported inside the functions, so importing this package is cheap.
"""

from sfedge.quantize.mixed import QdqSearch, mixed_precision, onnx_layer_macs
from sfedge.quantize.qdq import FLOAT_SCOPES, QUANTIZED_OP_TYPES, quantizable_layers, quantize_qdq, to_fp16
from sfedge.quantize.ranges import METHODS, compute_ranges, entropy_threshold, read_ranges, write_ranges
from sfedge.quantize.search import LayerSensitivity, SearchAdapter, SearchLayer, SearchResult, layer_role, search

__all__ = [
    "METHODS", "compute_ranges", "write_ranges", "read_ranges", "entropy_threshold",
    "quantize_qdq", "to_fp16", "quantizable_layers", "QUANTIZED_OP_TYPES", "FLOAT_SCOPES",
    "QdqSearch", "mixed_precision", "onnx_layer_macs",
    "SearchAdapter", "SearchLayer", "SearchResult", "LayerSensitivity", "search", "layer_role",
]
