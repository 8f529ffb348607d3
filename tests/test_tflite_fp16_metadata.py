"""TFLite's reduced-precision metadata: written for targets with fp16 arithmetic, read back, inert on x86.

Whether XNNPACK then computes in fp16 is a property of the ARM core; it is
shown on the emulated aarch64 device in tests/test_arm_device.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="the build extra's litert-torch converts the test model")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fp16_file(tmp_path_factory):
    from sfedge.backends.tflite.convert import cast_weights_fp16, convert_float

    d = tmp_path_factory.mktemp("fp16meta")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 1, 3, padding=1)).eval()
    convert_float(model, (1, 3, 32, 32), "NHWC", d / "fp32.tflite")
    cast_weights_fp16(d / "fp32.tflite", d / "fp16.tflite")
    return d / "fp16.tflite"


def _run(path, x):
    from sfedge.backends.tflite.runner import TFLiteRunner

    with TFLiteRunner(path, threads=1, layout="NHWC") as r:
        return r.run(x)


def test_metadata_round_trips_and_changes_nothing_else(fp16_file, tmp_path) -> None:
    from sfedge.backends.tflite.fp16 import (
        FP16_INFERENCE,
        mark_fp16_inference,
        reduced_precision,
        set_reduced_precision,
    )
    from sfedge.backends.tflite.ops import op_report

    marked = shutil.copy(fp16_file, tmp_path / "marked.tflite")
    assert reduced_precision(fp16_file) is None
    mark_fp16_inference(marked)
    assert reduced_precision(marked) == FP16_INFERENCE == "fp16accfp16"
    mark_fp16_inference(marked)  # idempotent: one entry, not two
    assert reduced_precision(marked) == FP16_INFERENCE
    assert op_report(marked).ops == op_report(fp16_file).ops, "operators and weights are written back as read"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    # x86 has no fp16 arithmetic: XNNPACK ignores the hint, the outputs are bit-identical.
    np.testing.assert_array_equal(_run(marked, x), _run(fp16_file, x))
    set_reduced_precision(marked, None)
    assert reduced_precision(marked) is None
