"""The pytorch backend: runner.py (device side): the torch reference model, for profiling it beside the artifacts."""
