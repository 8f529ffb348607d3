"""The TFLite backend: runner.py (device side), make.py (build side) and the converter, quantizer and op-report modules."""
