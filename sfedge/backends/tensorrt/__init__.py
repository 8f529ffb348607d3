"""TensorRT backend (Jetson): lint, calibration cache, trtexec commands, engine build, engine cache, runner.

What runs where:

* on any machine (this workstation's CPU included): :mod:`.make` (the ONNX
  export and its checks, INT8 quantization, the TensorRT rules lint
  :mod:`.rules`, the calibration cache :mod:`.calibration_cache`, the trtexec
  command per release :mod:`.commands`, the device folder), the GPU probe
  (:mod:`.gpu`) and the engine-cache keys (:mod:`.engine_cache`);
* where TensorRT and the target's GPU are (the Jetson): :mod:`.folder`
  (``build_from_folder``), :mod:`.builder` and :mod:`.runner`, none of which
  imports torch.  The engine is built and run through Polygraphy's TensorRT
  loaders and ``TrtRunner`` (:mod:`.loaders` imports them lazily and maps
  their errors); each module says what sfedge still does itself.

TensorRT cannot run on the machines sfedge is developed on: this package is
type-checked strictly against TensorRT 10.13's Python API instead (``make
typecheck``, tests/typecheck.py), and ``sfedge doctor`` is the first test on a
device.

Nothing here imports ``tensorrt`` at import time, and nothing creates
TensorRT objects before a subprocess has confirmed a usable GPU
(:func:`sfedge.backends.tensorrt.gpu.detect_gpu`): without one, TensorRT
crashes the process.  This package's ``__init__`` imports nothing, so the
device side never loads the build side.
"""
