"""Quantization-aware fine-tuning: the torch fake quantization is the file's arithmetic, and it helps.

The first tests use a tiny U-Net with non-trivial BatchNorm statistics (so
folding matters) on real fundus crops at 32x32: seconds.  The demo-model test
(slow) shows QAT recovering int8 agreement where plain calibration misses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfedge.backends.int8 import qat_qdq, qat_tflite
from sfedge.backends.onnxruntime.make import ort_scorer
from sfedge.calibration import load_calibration
from sfedge.parity import DEFAULT_TOLERANCES
from sfedge.quantize.qat import QatConfig, QatModel, copy_for_qat, fold_batchnorm, weighted_modules
from sfedge.quantize.qdq import quantize_qdq
from sfedge.source import ModelSource


@pytest.fixture(scope="module")
def tiny():
    """A small SFConv U-Net with BatchNorm statistics and affine parameters that are not the identity."""
    from sfedge.models import create_model

    torch.manual_seed(0)
    calib = load_calibration("fundus-demo", (32, 32))
    model = create_model("unet-sfconv", widths=[8, 16], s=0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(calib.calibration[:16]))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    src = ModelSource(model, "tiny-sfconv", {}, "0" * 64, (1, 3, 32, 32))
    return src, calib


def test_folding_batchnorm_keeps_the_outputs_and_removes_every_bn(tiny) -> None:
    src, calib = tiny
    x = torch.from_numpy(calib.holdout[:4])
    student, folded = copy_for_qat(src.model, x[:1])
    assert len(folded) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in src.model.modules()) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    with torch.no_grad():
        assert torch.allclose(student(x), src.model(x), atol=1e-4, rtol=1e-4)
    assert fold_batchnorm(student, x[:1]) == []  # nothing left to fold


def test_onnx_runtime_on_the_qdq_file_is_the_fake_quantized_torch_model(tiny, tmp_path) -> None:
    """Same scales, same weights: ORT on the Q/DQ ONNX agrees with fake-quant torch to within one output step."""
    src, calib = tiny
    score = ort_scorer(1, src.task)
    seen: dict[str, np.ndarray] = {}

    def capture(qat: QatModel) -> None:
        with torch.no_grad():
            seen["fake"] = qat.model(torch.from_numpy(calib.holdout)).numpy()

    fp32, ranges, run, qat = qat_qdq(src, calib, tmp_path, score, DEFAULT_TOLERANCES["fp32"],
                                     QatConfig(steps=6, batch=2, crop=32), before_strip=capture)
    assert run.steps == 6 and run.quantizers > 0 and len(ranges) == run.quantizers
    art = quantize_qdq(fp32, calib, tmp_path / "q.onnx", method="qat", ranges=ranges, write_ranges_file=False)
    import onnxruntime as ort

    so = ort.SessionOptions()
    # The Q/DQ graph's own arithmetic (dequantize, float kernel): what TensorRT's int8 kernels approximate.  With
    # graph optimizations on, ONNX Runtime fuses DQ-Conv-Q into integer kernels that requantize in their own way.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: calib.holdout[i : i + 1]})[0] for i in range(len(calib.holdout))])
    with torch.no_grad():
        tuned_float = qat.model(torch.from_numpy(calib.holdout)).numpy()
    fake = seen["fake"]
    step = (fake.max() - fake.min()) / 255  # one int8 step of the output's range
    diff = np.abs(out - fake)
    # Same scales and weights: outputs agree to float rounding.  The only exception is a value landing exactly on
    # a rounding boundary (torch multiplies by 1/scale, QuantizeLinear divides), which flips one int8 code and
    # moves the few outputs it reaches: bounded here to 1% of the outputs and a few steps.
    assert np.quantile(diff, 0.99) <= 1e-3 * step, f"ORT vs fake-quant torch: 99th percentile {np.quantile(diff, 0.99):.3g}"
    assert diff.max() <= 8 * step, f"ORT vs fake-quant torch: max {diff.max():.3g} > 8 steps of {step:.3g}"
    # and quantization is really on in both: the float model of the same weights is far from either
    assert np.quantile(np.abs(tuned_float - fake), 0.5) > 100 * np.quantile(diff, 0.5) + 1e-3 * step


def test_the_tflite_scheme_quantizes_transposed_conv_weights_per_output_channel(tiny) -> None:
    src, calib = tiny
    tuned, run = qat_tflite(src, calib, QatConfig(steps=2, batch=2, crop=32))
    assert run.scheme == "tflite" and tuned.weights_sha256 != src.weights_sha256
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for _, m in weighted_modules(tuned.model))
    from sfedge.quantize.qat import WeightQuant

    w = torch.randn(4, 3, 2, 2)  # ConvTranspose2d(4 -> 3): output channels on axis 1
    q = WeightQuant(axis=1)(w)
    for c in range(3):
        step = w[:, c].abs().max() / 127
        assert torch.allclose(q[:, c] / step, torch.round(q[:, c] / step), atol=1e-4)


@pytest.mark.slow
@pytest.mark.tier2
def test_qat_recovers_int8_agreement_where_calibration_misses(demo_sources, tmp_path) -> None:
    """The demo SFConv U-Net at 64x64: all layers int8 with entropy ranges misses 0.98; after QAT it does better."""
    from dataclasses import replace

    base = demo_sources["unet-sfconv"]
    src = replace(base, input_shape=(1, 3, 64, 64), _reference={})
    calib = load_calibration("fundus-demo", (64, 64))
    score = ort_scorer(2, src.task)
    ref = src.reference(calib.holdout)
    from sfedge.export import export_onnx
    from sfedge.quantize.ranges import compute_ranges

    fp32 = export_onnx(src, tmp_path / "m.onnx", score=score, check_inputs=calib.holdout)
    ptq = quantize_qdq(fp32, calib, tmp_path / "ptq.onnx", ranges=compute_ranges(fp32.path, calib, "entropy"),
                       reference=ref, score=score, write_ranges_file=False).parity
    assert DEFAULT_TOLERANCES["int8"].failures(ptq), f"plain calibration already meets the gate: {ptq.summary()}"
    tuned, ranges, _, _ = qat_qdq(src, calib, tmp_path, score, DEFAULT_TOLERANCES["fp32"],
                                  QatConfig(steps=60, batch=4, crop=64))
    qat = quantize_qdq(tuned, calib, tmp_path / "qat.onnx", method="qat", ranges=ranges, reference=ref, score=score,
                       write_ranges_file=False).parity
    assert qat.mean_abs < 0.9 * ptq.mean_abs, (qat.summary(), ptq.summary())  # measured: 0.300 vs 0.368
    assert qat.dice_agreement > ptq.dice_agreement, (qat.summary(), ptq.summary())


TINY_TARGET = """
name = "tiny-host"
description = "host CPU at 32x32 (tests)"
backend = ["onnxruntime", "tflite"]
precisions = ["fp32", "int8"]
default_precision = "int8"
layout = "NCHW"
threads = 1
input_size = [32, 32]
[tolerances.int8]
dice_agreement = 0.0
fallback_cosine = 0.0
shifted_dice_agreement = 0.0
"""


@pytest.mark.slow
@pytest.mark.tier2
def test_a_qat_build_writes_int8_io_and_learned_scales_into_the_bundle(tiny, tmp_path, monkeypatch) -> None:
    """The whole path: --qat through build_bundle for ONNX Runtime and TFLite, the README's pixel map, verify."""
    from sfedge.backends.int8 import Int8Options
    from sfedge.build import build_bundle
    from sfedge.verify import verify_bundle

    src, _ = tiny
    target = tmp_path / "tiny-host.toml"
    target.write_text(TINY_TARGET)
    res = build_bundle(src.model, target, "int8", out_dir=tmp_path / "b", int8=Int8Options(qat_steps=3))
    m = res.bundle.manifest
    arts = {a["backend"]: a for a in m["artifacts"]}
    assert set(arts) == {"onnxruntime", "tflite"} and not res.failures
    assert arts["onnxruntime"]["meta"]["mixed_precision"]["method"] == "qat"
    assert arts["onnxruntime"]["meta"]["qat"]["steps"] == 3 and arts["tflite"]["meta"]["qat"]["steps"] == 3
    tfl = arts["tflite"]
    assert tfl["inputs"][0]["dtype"] == "int8" and tfl["outputs"][0]["dtype"] == "int8"  # full-integer I/O
    for a in arts.values():
        assert a["shifted_parity"]["samples"] == 16
    readme = (res.path / "README.md").read_text()
    assert "uint8 pixel p -> int8 q" in readme and "shifted held-out" in readme
    assert (res.path / "shifted_inputs.npy").is_file() and m["reference"]["shifted"]["inputs"] == "shifted_inputs.npy"
    monkeypatch.setenv("SFEDGE_TARGETS", str(tmp_path))  # verify holds a bundle to the target installed here
    report = verify_bundle(res.path)
    assert report.passed and all(c.shifted_parity for c in report.artifacts if c.status == "pass")
