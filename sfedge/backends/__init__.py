"""Backends, one package each with the same two faces (Polygraphy's loader/runner split).

``sfedge/backends/<name>/runner.py`` runs an artifact (device side: numpy and
the runtime only, behind :class:`sfedge.backends.base.Runner`);
``sfedge/backends/<name>/make.py`` builds one from a torch model (build side,
typed by :class:`sfedge.backends.maker.Maker`).  What each backend is (file
suffixes, precisions, layouts, runtime packages) is one row in
:mod:`sfedge.backends.registry`.

This package imports nothing at import time, so a device with only ONNX
Runtime (or only tflite-runtime, or only TensorRT) can use its own backend.
"""
