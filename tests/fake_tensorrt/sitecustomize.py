"""TensorRT stand-ins for the on-device build tests (a machine with no TensorRT and no GPU).

On PYTHONPATH with SFEDGE_FAKE_TENSORRT=1, this replaces exactly three things
before sfedge imports them: the GPU probe (a Jetson Orin with TensorRT 10.3),
the engine builder (the "engine" is the ONNX file it was asked to build from,
plus a timing cache) and the TensorRT runner (ONNX Runtime running that
"engine").  Everything else (verify-first, path confinement, the manifest
update, parity gating, verify) is the real code.
"""

import os

if os.environ.get("SFEDGE_FAKE_TENSORRT") == "1":
    import shutil
    import time
    from pathlib import Path

    import sfedge.backends.tensorrt.builder as _builder
    import sfedge.backends.tensorrt.gpu as _gpu
    import sfedge.backends.tensorrt.runner as _runner
    from sfedge.backends.onnxruntime.runner import OnnxRuntimeRunner
    from sfedge.fileio import atomic_path

    def detect_gpu(timeout: float = 60.0):
        return _gpu.GpuInfo(name="Fake Orin", sm=87, memory_bytes=8 << 30, cuda_driver=12060, tensorrt="10.3.0",
                            jetson_model="Fake Jetson", l4t="R36")

    def build_engine(onnx_path, engine_path, *, precision, calibration_cache=None, timing_cache=None,
                     workspace_mb=1024, strongly_typed=None, progress=None, **_):
        start = time.perf_counter()
        with atomic_path(engine_path) as tmp:
            shutil.copyfile(onnx_path, tmp)
        if timing_cache is not None:
            with atomic_path(timing_cache) as tmp:
                Path(tmp).write_bytes(b"fake timing cache")
        return _builder.EngineBuild(Path(engine_path), "10.3.0", precision, bool(strongly_typed), False,
                                    time.perf_counter() - start, Path(engine_path).stat().st_size,
                                    Path(timing_cache) if timing_cache is not None else None)

    class FakeTensorRTRunner(OnnxRuntimeRunner):
        backend = "tensorrt"

    _gpu.detect_gpu = detect_gpu
    _builder.build_engine = build_engine
    _runner.TensorRTRunner = FakeTensorRTRunner
