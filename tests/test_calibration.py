"""Calibration sets: the built-in fundus set, folders of real images, and clear errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfedge.calibration import load_calibration
from sfedge.errors import CalibrationError, UnknownNameError

SPEC = """
name = "{name}"
[source]
folder = "{folder}"
[preprocessing]
channels = {channels}
mean = {mean}
std = {std}
[sampling]
count = 4
holdout = 2
seed = 3
"""


def _spec(tmp_path: Path, folder: Path, channels: int = 3) -> Path:
    p = tmp_path / "set.toml"
    p.write_text(SPEC.format(name="set", folder=folder, channels=channels, mean=[0.5] * channels, std=[0.25] * channels))
    return p


def _images(folder: Path, n: int, channels: int = 3, size: int = 48) -> None:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    retina = data.retina()
    for i in range(n):
        crop = retina[300 + 40 * i : 300 + 40 * i + size, 400 : 400 + size]
        Image.fromarray(crop if channels == 3 else crop[..., 1]).save(folder / f"img{i}.png")


def test_fundus_demo_is_deterministic_with_disjoint_splits() -> None:
    a = load_calibration("fundus-demo", (64, 64))
    b = load_calibration("fundus-demo", (64, 64))
    n = 32 * (1 + a.spec.augment.copies)  # the 32 crops, then their augmented copies
    assert a.calibration.shape == (n, 3, 64, 64) and a.holdout.shape == (16, 3, 64, 64)
    assert a.sha256 == b.sha256 and np.array_equal(a.calibration, b.calibration)
    assert a.calibration.std() > 0.3  # real image content, not constants
    reader = a.onnx_reader("input")
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item["input"])
    assert len(batches) == n and batches[0].shape == (1, 3, 64, 64)
    part = a.onnx_reader("input", "holdout", 4, 7)
    assert len(part) == 3 and np.array_equal(part.get_next()["input"][0], a.holdout[4])
    nhwc = next(a.batches("holdout", layout="NHWC"))
    assert nhwc.shape == (1, 64, 64, 3)


def test_a_folder_of_images_is_read_resized_and_split(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 7)
    np.save(tmp_path / "imgs" / "extra.npy", np.zeros((30, 30, 3), np.uint8))
    c = load_calibration(_spec(tmp_path, tmp_path / "imgs"), (32, 32))
    assert c.calibration.shape == (4 * (1 + c.spec.augment.copies), 3, 32, 32) and c.holdout.shape == (2, 3, 32, 32)
    assert not set(c.files[:4]) & set(c.files[4:])


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="has no images"):
        load_calibration(_spec(tmp_path, tmp_path / "empty"), (32, 32))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(_spec(tmp_path, tmp_path / "nowhere"), (32, 32))


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 3)
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG this is not really a png")
    with pytest.raises(CalibrationError, match=r"cannot read calibration image .*broken\.png"):
        load_calibration(_spec(tmp_path, tmp_path / "imgs"), (32, 32))


def test_wrong_channel_count_names_the_file(tmp_path: Path) -> None:
    _images(tmp_path / "gray", 3, channels=1)
    with pytest.raises(CalibrationError, match=r"img\d\.png has 1 channel\(s\) but the spec says 3"):
        load_calibration(_spec(tmp_path, tmp_path / "gray", channels=3), (32, 32))


def test_unknown_set_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="valid calibration sets: .*fundus-demo"):
        load_calibration("octa-nowhere", (32, 32))
