"""`sfedge predict` and `sfedge verify --whole-image`: whole images through a bundle, tiled, against torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # builds a bundle from the trained demo model

SMALL = """
name = "{name}"
description = "test target: {backend}, 64x64"
backend = "{backend}"
precisions = ["fp32"]
threads = 1
input_size = [64, 64]
[device]
{device}
"""
DEVICES = {"onnxruntime": 'arch = "x86_64"', "tensorrt": 'tensorrt = "10.3"\nsm = 87'}


@pytest.fixture(scope="module")
def bundles(demo_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """{"ort": an ONNX Runtime fp32 bundle at 64x64, "trt": a TensorRT bundle (device folder only, no engine)}."""
    from sfedge.build import build_bundle
    from sfedge.targets import load_target

    d = tmp_path_factory.mktemp("predict")
    out = {}
    for key, backend in (("ort", "onnxruntime"), ("trt", "tensorrt")):
        f = d / f"{key}-small.toml"
        f.write_text(SMALL.format(name=f"{key}-small", backend=backend, device=DEVICES[backend]))
        out[key] = build_bundle(demo_checkpoints["unet-sfconv"], load_target(f), "fp32", out_dir=d / "bundles").path
    return out


@pytest.fixture(scope="module")
def strip() -> np.ndarray:
    """The held-out right half of the fundus photograph at the demo's scale (uint8 HxWx3, 706x353)."""
    from sfedge.datasets.fundus import load_fundus_image

    image, _ = load_fundus_image(0.5)
    return np.ascontiguousarray(image[:, image.shape[1] // 2 :])


def _torch_tiled(ckpt_path: Path, image: np.ndarray, bundle: Path) -> np.ndarray:
    from sfedge.bundle import load_bundle
    from sfedge.checkpoint import load_checkpoint
    from sfedge.models.tiled import tiled_forward
    from sfedge.predict import bundle_preprocessing, bundle_tiling, bundle_window

    b = load_bundle(bundle)
    ck = load_checkpoint(ckpt_path)
    x = bundle_preprocessing(b).apply(image)[None]
    return tiled_forward(ck.model, x, bundle_tiling(b), bundle_window(b))[0]


def test_predict_writes_masks_and_logits_that_match_torch_tiled(sfedge_cli, bundles, strip, demo_checkpoints, tmp_path) -> None:
    from PIL import Image

    Image.fromarray(strip).save(tmp_path / "strip.png")
    np.save(tmp_path / "strip_npy.npy", strip.astype(np.float32) / 255.0)  # float NPY in [0, 1]
    rc, out, err = sfedge_cli("predict", str(bundles["ort"]), "strip.png", "strip_npy.npy", "-o", "out", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["window"] == [64, 64] and len(result["images"]) == 2
    reference = _torch_tiled(demo_checkpoints["unet-sfconv"], strip, bundles["ort"])
    for stem in ("strip", "strip_npy"):
        logits = np.load(tmp_path / "out" / f"{stem}.logits.npy")
        mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}.mask.png"))
        assert logits.shape == (1, *strip.shape[:2]) and logits.dtype == np.float32
        assert mask.shape == strip.shape[:2] and mask.dtype == np.uint8
        assert np.array_equal(mask, np.where(logits[0] > 0, 255, 0))
        assert 0.01 < (mask > 0).mean() < 0.5, "vessels, not an empty or full mask"
        assert np.abs(logits - reference).max() <= 1e-4 * (reference.max() - reference.min())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "strip.logits.npy", "strip.mask.png", "strip_npy.logits.npy", "strip_npy.mask.png"], "no temporary files left"


def test_scale_runs_at_the_model_resolution_and_returns_the_image_size(bundles, strip, tmp_path) -> None:
    """--scale 0.5 on a doubled image = predicting the image resized to half, then logits resized back."""
    from PIL import Image

    from sfedge.bundle import load_bundle
    from sfedge.images import resize
    from sfedge.predict import bundle_tiling, predict_files

    big = np.asarray(Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.Resampling.BILINEAR))
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(resize(big, strip.shape[:2])).save(tmp_path / "half.png")
    b = load_bundle(bundles["ort"])
    [scaled] = predict_files(b, [tmp_path / "big.png"], tmp_path / "a", tiling=bundle_tiling(b), scale=0.5)
    [half] = predict_files(b, [tmp_path / "half.png"], tmp_path / "b", tiling=bundle_tiling(b))
    assert scaled.shape == [1, *big.shape[:2]] and half.shape == [1, *strip.shape[:2]]
    assert half.windows == scaled.windows, "the model ran at the reduced size"
    up = resize(np.load(half.logits)[0][..., None], big.shape[:2])[..., 0]
    np.testing.assert_allclose(np.load(scaled.logits)[0], up, atol=1e-5)
    assert np.asarray(Image.open(scaled.mask)).shape == big.shape[:2]


@pytest.mark.parametrize("case", ["missing", "unreadable", "channels", "no-runnable-artifact", "same-stem"])
def test_bad_input_is_one_line_and_writes_nothing(bundles, strip, tmp_path, capsys, case) -> None:
    from PIL import Image

    from sfedge.cli import main

    good = tmp_path / "good.png"
    Image.fromarray(strip).save(good)
    (tmp_path / "sub").mkdir()
    shutil.copy(good, tmp_path / "sub" / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    Image.fromarray(strip[..., 1]).save(tmp_path / "grey.png")
    bundle, images, expect = {
        "missing": (bundles["ort"], [good, tmp_path / "nope.png"], "nope.png does not exist"),
        "unreadable": (bundles["ort"], [good, tmp_path / "broken.png"], "cannot read image"),
        "channels": (bundles["ort"], [good, tmp_path / "grey.png"], "has 1 channel(s) but the model takes 3"),
        "no-runnable-artifact": (bundles["trt"], [good], "no runnable artifact"),
        "same-stem": (bundles["ort"], [good, tmp_path / "sub" / "good.png"], "named good"),
    }[case]
    rc = main(["predict", str(bundle), *map(str, images), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("sfedge predict: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"


def test_verify_whole_image_checks_every_artifact_tiled(sfedge_cli, bundles) -> None:
    rc, out, err = sfedge_cli("verify", str(bundles["ort"]), "--whole-image", "--json")
    assert rc == 0, out + err
    report = json.loads(out)
    whole = [a for a in report["artifacts"] if "whole image" in a["path"]]
    assert len(whole) == 1 and whole[0]["status"] == "pass"
    assert whole[0]["parity"]["max_abs"] <= 1e-4 and whole[0]["parity"]["dice_agreement"] >= 0.99
    m = json.loads((bundles["ort"] / "manifest.json").read_text())
    assert {m["whole_image"]["input"], m["whole_image"]["reference"]} <= set(m["files"]), "hashed like every file"
    assert m["whole_image"]["windows"] > 1 and "Whole images" in (bundles["ort"] / "README.md").read_text()


def test_verify_whole_image_on_a_bundle_without_one_is_a_clear_error(sfedge_cli, bundles, tmp_path) -> None:
    old = tmp_path / "old-bundle"
    shutil.copytree(bundles["ort"], old)
    m = json.loads((old / "manifest.json").read_text())
    del m["whole_image"]
    (old / "manifest.json").write_text(json.dumps(m))
    rc, out, err = sfedge_cli("verify", str(old), "--whole-image")
    assert rc == 2 and "has no whole-image reference" in err and "Traceback" not in err
    rc, out, err = sfedge_cli("predict", "--help")
    assert rc == 0 and "examples:" in out
