"""The onnxruntime backend: runner.py (device side) and make.py (build side)."""
