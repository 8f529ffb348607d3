"""Second tier (`make test-e2e`): QAT on the trained demo SFConv U-Net, built for host-cpu as a user would.

Minutes per test: quantization-aware fine-tuning runs for both int8 schemes (the Q/DQ ONNX and TFLite).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _float_cost(art: dict) -> float:
    mp = art["meta"].get("mixed_precision") or (art["meta"].get("quantize") or {}).get("search") or {}
    return float(mp.get("float_cost") or 0.0)


def test_qat_builds_the_demo_sfconv_int8_bundle_with_no_more_float_than_calibration(demo_checkpoints, tmp_path):
    from sfedge.backends.int8 import Int8Options
    from sfedge.build import build_bundle
    from sfedge.verify import verify_bundle

    ckpt = demo_checkpoints["unet-sfconv"]
    plain = build_bundle(ckpt, "host-cpu", "int8", out_dir=tmp_path / "plain")
    qat = build_bundle(ckpt, "host-cpu", "int8", out_dir=tmp_path / "qat", int8=Int8Options(qat_steps=150))
    for res in (plain, qat):
        for a in res.bundle.manifest["artifacts"]:
            assert a["parity"]["dice_agreement"] >= 0.98 and a["shifted_parity"]["dice_agreement"] >= 0.97
    by = {r: {a["backend"]: a for a in res.bundle.manifest["artifacts"]} for r, res in (("plain", plain), ("qat", qat))}
    for backend in ("onnxruntime", "tflite"):
        assert _float_cost(by["qat"][backend]) <= _float_cost(by["plain"][backend])
    tfl = by["qat"]["tflite"]
    assert tfl["inputs"][0]["dtype"] == "int8" and tfl["outputs"][0]["dtype"] == "int8"
    assert verify_bundle(qat.path).passed
