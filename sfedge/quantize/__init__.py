"""Quantization stage: calibration ranges, explicit Q/DQ and fp16 ONNX, per-layer sensitivity and mixed precision."""
