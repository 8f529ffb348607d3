"""Calibration sets: real images, preprocessed exactly like the model's input, for every backend.

A calibration set is described by a small TOML spec in ``calibration/``::

    name = "my-octa"
    description = "200 OCTA scans from site A"
    [source]
    folder = "/data/octa/png"      # or: glob = "/data/octa/**/*.png", or: builtin = "fundus-demo"
    [preprocessing]
    channels = 1
    mean = [0.31]
    std = [0.22]
    [sampling]
    count = 64                     # calibration samples
    holdout = 16                   # held-out samples for parity checks (never used to calibrate)
    seed = 0
    size = [256, 256]              # optional: default is the target's input size
    [augment]                      # optional (these are the defaults): camera-like variation, see sfedge.augment
    scale = [0.75, 1.33]           # zoom; exposure, contrast, blur (sigma px) and noise (std) likewise
    copies = 1                     # augmented copies of each calibration sample join the calibration split
    shifted = 16                   # augmented held-out samples: the shifted split parity is also gated on

The calibration split holds the ``count`` samples followed by their
augmented copies; the *shifted* split holds augmented held-out samples
(other scale, exposure, contrast, blur, noise; never calibrated on), so
every gate also says how an artifact does on inputs unlike the calibration
crops.

One :class:`CalibrationSet` type feeds every backend: ONNX Runtime's Q/DQ
calibrators (``onnx_reader``), the TFLite quantizer (``tflite_samples``) and
TensorRT's calibration cache, all through :meth:`CalibrationSet.batches`.
Images are read with Pillow (PNG/JPEG/TIFF) or numpy (NPY); the built-in
``fundus-demo`` set crops scikit-image's real fundus photograph.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import itertools
import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfedge.augment import DEFAULT_AUGMENT, Augment, augment_samples, parse_augment
from sfedge.datasets.fundus import DEMO_SCALE, load_fundus_image
from sfedge.errors import CalibrationError, UnknownNameError
from sfedge.preprocess import FUNDUS_PREPROCESSING, Preprocessing

__all__ = [
    "CalibrationSpec", "CalibrationSet", "load_calibration", "list_calibrations", "calibration_dirs", "IMAGE_SUFFIXES",
    "holdout_image",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
BUILTINS = ("fundus-demo",)
SPEC_KEYS = ("name", "description", "source", "preprocessing", "sampling", "augment")
SOURCE_KEYS = ("folder", "glob", "builtin")
SAMPLING_KEYS = ("count", "holdout", "seed", "size", "scale")


@dataclass(frozen=True)
class CalibrationSpec:
    """What a calibration spec file says (validated)."""

    name: str
    description: str
    source: dict
    preprocessing: Preprocessing
    count: int = 32
    holdout: int = 16
    seed: int = 0
    size: tuple[int, int] | None = None
    scale: float | None = None
    path: str | None = None
    augment: Augment = DEFAULT_AUGMENT

    def as_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "source": self.source,
            "preprocessing": self.preprocessing.as_dict(), "count": self.count, "holdout": self.holdout,
            "seed": self.seed, "size": list(self.size) if self.size else None, "scale": self.scale,
            "augment": self.augment.as_dict(),
        }


@dataclass
class CalibrationSet:
    """Preprocessed calibration, held-out and shifted held-out samples, float32 (N, C, H, W), and their origin."""

    spec: CalibrationSpec
    calibration: np.ndarray
    holdout: np.ndarray
    files: list[str] = field(default_factory=list)
    shifted: np.ndarray | None = None  # augmented held-out samples (None or empty: no shifted split)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return tuple(self.calibration.shape[1:])  # type: ignore[return-value]

    @property
    def sha256(self) -> str:
        """Hash of the spec and every sample's bytes: what a manifest records."""
        h = hashlib.sha256(json.dumps(self.spec.as_dict(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.calibration).tobytes())
        h.update(np.ascontiguousarray(self.holdout).tobytes())
        if self.shifted is not None and len(self.shifted):
            h.update(np.ascontiguousarray(self.shifted).tobytes())
        return h.hexdigest()

    @property
    def has_shifted(self) -> bool:
        """Whether a shifted held-out split exists (the gates check it when it does)."""
        return self.shifted is not None and len(self.shifted) > 0

    def batches(self, split: str = "calibration", layout: str = "NCHW", batch: int = 1) -> Iterator[np.ndarray]:
        """Samples of ``split`` ("calibration", "holdout" or "shifted") in ``layout``, ``batch`` at a time."""
        data = {"calibration": self.calibration, "holdout": self.holdout, "shifted": self.shifted}.get(split)
        if data is None:
            raise CalibrationError(f"unknown split '{split}'", "use 'calibration', 'holdout' or 'shifted'")
        if layout == "NHWC":
            data = np.ascontiguousarray(data.transpose(0, 2, 3, 1))
        for i in range(0, len(data), batch):
            yield data[i : i + batch]

    def onnx_reader(
        self, input_name: str, split: str = "calibration", start: int = 0, stop: int | None = None
    ) -> OnnxCalibrationReader:
        """An onnxruntime ``CalibrationDataReader`` over samples ``start:stop`` of ``split`` (one per call).

        A slice lets calibrators collect in chunks: onnxruntime keeps every
        intermediate tensor of what one reader yields in memory.
        """
        return OnnxCalibrationReader(self, input_name, split, start, stop)

    def tflite_samples(self, input_name: str, layout: str = "NHWC", split: str = "calibration") -> list[dict[str, np.ndarray]]:
        """Samples as ai-edge-quantizer wants them: one {input_name: (1, ...)} dict per sample."""
        return [{input_name: b} for b in self.batches(split, layout)]


class OnnxCalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader protocol (get_next / rewind) over a CalibrationSet.

    Not subclassing onnxruntime's ABC keeps this module importable without
    onnxruntime; its calibrators only call ``get_next``.
    """

    def __init__(self, calib: CalibrationSet, input_name: str, split: str = "calibration", start: int = 0,
                 stop: int | None = None) -> None:
        self._calib, self._name, self._split = calib, input_name, split
        data = {"calibration": calib.calibration, "holdout": calib.holdout, "shifted": calib.shifted}.get(split)
        total = 0 if data is None else len(data)
        self._start, self._stop = start, total if stop is None else min(stop, total)
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._it, None)
        return None if b is None else {self._name: b}

    def rewind(self) -> None:
        self._it = itertools.islice(self._calib.batches(self._split), self._start, self._stop)

    def __len__(self) -> int:
        return max(0, self._stop - self._start)


def calibration_dirs() -> list[Path]:
    """Where specs are looked up by name: $SFEDGE_CALIBRATION, ./calibration, the repository's calibration/."""
    dirs = [Path(p) for p in os.environ.get("SFEDGE_CALIBRATION", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "calibration", Path(__file__).resolve().parent.parent / "calibration"]
    out, seen = [], set()
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def list_calibrations() -> list[str]:
    """Names of the calibration specs found (plus the built-ins)."""
    return sorted({f.stem for d in calibration_dirs() for f in d.glob("*.toml")} | set(BUILTINS))


def _spec_err(path: Path | str, msg: str, hint: str | None = None) -> CalibrationError:
    return CalibrationError(f"calibration spec {path}: {msg}", hint)


def load_spec(name_or_path: str | os.PathLike[str]) -> CalibrationSpec:
    """A calibration spec by name or path (the built-in ``fundus-demo`` needs no file)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise CalibrationError(f"calibration spec {p} does not exist", "give an existing .toml file or a set name")
        return _parse_spec(p)
    if p.is_dir():
        # A bare folder of images: default preprocessing is not knowable, so refuse clearly.
        raise CalibrationError(
            f"{p} is a folder, not a calibration spec",
            "write a spec TOML with [source] folder = \"...\" and its [preprocessing] (see calibration/README.md)",
        )
    for d in calibration_dirs():
        f = d / f"{name_or_path}.toml"
        if f.is_file():
            return _parse_spec(f)
    if str(name_or_path) == "fundus-demo":
        return CalibrationSpec(name="fundus-demo", description="built-in", source={"builtin": "fundus-demo"},
                               preprocessing=FUNDUS_PREPROCESSING)
    raise UnknownNameError("calibration set", str(name_or_path), list_calibrations())


def _int(path: Path, key: str, v: object, minimum: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise _spec_err(path, f"bad value {v!r} for '{key}'", f"give an integer >= {minimum}")
    return v


def _parse_spec(path: Path) -> CalibrationSpec:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise _spec_err(path, f"is not valid TOML ({e})") from e
    for k in data:
        if k not in SPEC_KEYS:
            raise _spec_err(path, f"unknown key '{k}'", f"valid keys: {', '.join(SPEC_KEYS)}")
    source = data.get("source")
    if not isinstance(source, dict) or len(source) != 1 or next(iter(source)) not in SOURCE_KEYS:
        raise _spec_err(path, "[source] must have exactly one of folder, glob or builtin",
                        "e.g. [source] folder = \"images/\"")
    if "builtin" in source and source["builtin"] not in BUILTINS:
        raise UnknownNameError("built-in calibration source", str(source["builtin"]), list(BUILTINS))
    if "folder" in source:  # relative folders are relative to the spec file
        source = {"folder": str((path.parent / source["folder"]).resolve())}
    elif "glob" in source and not os.path.isabs(source["glob"]):
        source = {"glob": str(path.parent / source["glob"])}
    pre_d = data.get("preprocessing")
    if pre_d is None:
        pre = FUNDUS_PREPROCESSING if "builtin" in source else None
        if pre is None:
            raise _spec_err(path, "missing [preprocessing]", "give channels, mean and std as the model was trained with")
    else:
        pre = Preprocessing.from_dict(pre_d)
    sampling = data.get("sampling") or {}
    for k in sampling:
        if k not in SAMPLING_KEYS:
            raise _spec_err(path, f"unknown key 'sampling.{k}'", f"valid keys: {', '.join(SAMPLING_KEYS)}")
    size = sampling.get("size")
    if size is not None and (not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
        raise _spec_err(path, f"bad value {size!r} for 'sampling.size'", "give [height, width]")
    scale = sampling.get("scale")
    if scale is not None and (not isinstance(scale, (int, float)) or scale <= 0):
        raise _spec_err(path, f"bad value {scale!r} for 'sampling.scale'", "give a positive number")
    augment = parse_augment(data["augment"], f"calibration spec {path}") if "augment" in data else DEFAULT_AUGMENT
    return CalibrationSpec(
        augment=augment,
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        source=source,
        preprocessing=pre,
        count=_int(path, "sampling.count", sampling.get("count", 32), 1),
        holdout=_int(path, "sampling.holdout", sampling.get("holdout", 16), 1),
        seed=_int(path, "sampling.seed", sampling.get("seed", 0), 0),
        size=tuple(size) if size else None,  # type: ignore[arg-type]
        scale=float(scale) if scale is not None else None,
        path=str(path),
    )


def load_calibration(
    name_or_path: str | os.PathLike[str] | CalibrationSpec, size: tuple[int, int] | None = None
) -> CalibrationSet:
    """Read and preprocess a calibration set; ``size`` (H, W) is the model input size (the spec's wins if set).

    Errors name the offending file: an empty folder, an unreadable image, or an
    image whose channel count differs from the spec's.
    """
    spec = name_or_path if isinstance(name_or_path, CalibrationSpec) else load_spec(name_or_path)
    hw = spec.size or size
    if hw is None:
        raise CalibrationError(f"calibration set '{spec.name}' has no size", "pass the model input size or set sampling.size")
    hw = (int(hw[0]), int(hw[1]))
    if "builtin" in spec.source:
        return _fundus_demo(spec, hw)
    files = _source_files(spec)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(files))
    files = [files[i] for i in order]
    if len(files) < 2:
        raise CalibrationError(
            f"calibration set '{spec.name}' has {len(files)} image(s) in {_where(spec)}; at least 2 are needed",
            "add images (one for calibration and one held out at the very least)",
        )
    n_hold = min(spec.holdout, max(1, len(files) // 4))
    n_cal = min(spec.count, len(files) - n_hold)
    chosen = files[:n_cal] + files[len(files) - n_hold :]
    samples = np.stack([spec.preprocessing.apply(_read_image(f, spec.preprocessing.channels, hw)) for f in chosen])
    return _augmented(CalibrationSet(spec, samples[:n_cal], samples[n_cal:], [str(f) for f in chosen]))


def _where(spec: CalibrationSpec) -> str:
    return spec.source.get("folder") or spec.source.get("glob") or "?"


def _source_files(spec: CalibrationSpec) -> list[Path]:
    if "folder" in spec.source:
        folder = Path(spec.source["folder"])
        if not folder.is_dir():
            raise CalibrationError(f"calibration folder {folder} does not exist", f"fix [source] folder in {spec.path}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CalibrationError(
                f"calibration folder {folder} has no images", f"add {', '.join(IMAGE_SUFFIXES)} files or fix [source] folder"
            )
        return files
    pattern = spec.source["glob"]
    files = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration glob {pattern} matches no images", f"fix [source] glob in {spec.path}")
    return files


MAX_PIXELS = 40_000_000  # a 6000x6000 photograph; larger ones are refused before they are decoded
NPY_DTYPES = ("uint8", "uint16", "float16", "float32", "float64")


def _too_large(path: Path, h: int, w: int) -> CalibrationError:
    return CalibrationError(f"calibration image {path} is {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel limit",
                            "downscale it first (calibration images are resized to the model input anyway)")


def _read_image(path: Path, channels: int, hw: tuple[int, int] | None) -> np.ndarray:
    """Read one image as (H, W, C) resized to ``hw`` (None: its own size; uint8 kept uint8; float NPY kept float).

    Untrusted files are checked before they cost anything: the pixel count is
    read from the header before decoding (a few-KB PNG can declare 9500x9500
    pixels and take minutes and gigabytes), NPY files are memory-mapped and
    checked for dtype, shape, NaN/inf and value range (floats in [0, 1], as
    :class:`~sfedge.preprocess.Preprocessing` expects).
    """
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] > 4):
                raise CalibrationError(f"calibration image {path} has shape {arr.shape}", "images must be HxW or HxWxC")
            if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
                raise _too_large(path, arr.shape[0], arr.shape[1])
            if arr.dtype.name not in NPY_DTYPES:
                raise CalibrationError(f"calibration image {path} has dtype {arr.dtype.name}",
                                       f"save it as one of {', '.join(NPY_DTYPES)} (floats scaled to [0, 1])")
            arr = np.array(arr)
        else:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise _too_large(path, h, w)
                im.load()
                arr = np.asarray(im)
    except CalibrationError:
        raise
    except Exception as e:  # PIL and numpy raise many types for damaged files
        raise CalibrationError(f"cannot read calibration image {path}: {e}", "remove or replace the file") from e
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise CalibrationError(f"calibration image {path} has NaN or infinite values", "remove or fix the file")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise CalibrationError(f"calibration image {path} has values in [{lo:.4g}, {hi:.4g}], outside [0, 1]",
                                   "scale float images to [0, 1] (or save them as uint8/uint16)")
    elif arr.dtype.name not in ("uint8", "uint16"):
        raise CalibrationError(f"calibration image {path} has pixel type {arr.dtype.name}",
                               "use 8- or 16-bit images, or float NPY scaled to [0, 1]")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise CalibrationError(f"calibration image {path} has shape {arr.shape}", "images must be HxW or HxWxC")
    if arr.shape[-1] != channels:
        raise CalibrationError(
            f"calibration image {path} has {arr.shape[-1]} channel(s) but the spec says {channels}",
            "convert the image or fix [preprocessing] channels",
        )
    if hw is not None and arr.shape[:2] != hw:
        arr = _resize(arr, hw)
    return arr


def _resize(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    out = resize(arr, hw, order=1, anti_aliasing=True, preserve_range=True)
    return out.round().astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else out.astype(arr.dtype)


def _fundus_demo(spec: CalibrationSpec, hw: tuple[int, int]) -> CalibrationSet:
    """Deterministic crops (with flips) of scikit-image's fundus photograph.

    Calibration crops come from the left half, held-out crops from the right
    half, so the two splits share no pixels.  A 1-channel spec takes the green
    channel (where fundus vessels have their contrast).  The photograph is used at
    ``scale`` (default: the demo's training scale) or larger when a crop would
    not fit in half the width.
    """
    scale = _fundus_scale(spec, hw)
    image, fov = load_fundus_image(scale)
    h, w = fov.shape
    rng = np.random.default_rng(spec.seed)
    half = w // 2

    def crops(n: int, x0: int, x1: int) -> list[np.ndarray]:
        out = []
        while len(out) < n:
            y = int(rng.integers(0, h - hw[0] + 1))
            x = int(rng.integers(x0, x1 - hw[1] + 1))
            if not fov[y + hw[0] // 2, x + hw[1] // 2]:
                continue
            im = image[y : y + hw[0], x : x + hw[1]]
            if spec.preprocessing.channels == 1:
                im = im[..., 1:2]
            if rng.random() < 0.5:
                im = im[:, ::-1]
            if rng.random() < 0.5:
                im = im[::-1]
            out.append(spec.preprocessing.apply(np.ascontiguousarray(im)))
        return out

    cal = np.stack(crops(spec.count, 0, half))
    hold = np.stack(crops(spec.holdout, half, w))
    return _augmented(CalibrationSet(spec, cal, hold, [f"skimage.data.retina() scale={scale}"]))


def _fundus_scale(spec: CalibrationSpec, hw: tuple[int, int]) -> float:
    """The photograph's scale for crops of ``hw``: the spec's (default: the demo's training scale), or larger
    when a crop would not fit in half the width."""
    base = 1411
    return round(max(spec.scale or DEMO_SCALE, 2 * max(hw) / base + 1e-3), 3)


WHOLE_IMAGE_MAX = 2048  # larger held-out images are centre-cropped to this many pixels per side


def holdout_image(calib: CalibrationSet) -> tuple[np.ndarray, str]:
    """One whole held-out image, raw (H, W, C) as a device would read it, and where it came from.

    ``fundus-demo``: the right half of the photograph (where the held-out crops come from) at the set's
    scale; a folder or glob set: its last held-out file at its own size (centre-cropped to
    ``WHOLE_IMAGE_MAX`` per side).  This is what ``sfedge verify --whole-image`` runs tiled.
    """
    hw = calib.shape[1:]
    if "builtin" in calib.spec.source:
        from sfedge.datasets.fundus import load_fundus_image

        scale = _fundus_scale(calib.spec, hw)
        image, _ = load_fundus_image(scale)
        half = image.shape[1] // 2
        if calib.spec.preprocessing.channels == 1:  # as the 1-channel crops: the green channel
            image = image[..., 1:2]
        return np.ascontiguousarray(image[:, half:]), f"skimage.data.retina() scale={scale}, right half"
    path = Path(calib.files[-1])
    arr = _read_image(path, calib.spec.preprocessing.channels, None)
    h, w = arr.shape[:2]
    top, left = max(0, (h - WHOLE_IMAGE_MAX) // 2), max(0, (w - WHOLE_IMAGE_MAX) // 2)
    arr = arr[top : top + WHOLE_IMAGE_MAX, left : left + WHOLE_IMAGE_MAX]
    return np.ascontiguousarray(arr), str(path) + (" (centre crop)" if arr.shape[:2] != (h, w) else "")



def _augmented(cs: CalibrationSet) -> CalibrationSet:
    """``cs`` with its spec's augmented calibration copies appended and its shifted held-out split made."""
    aug, pre = cs.spec.augment, cs.spec.preprocessing
    n = len(cs.calibration)
    copies = augment_samples(cs.calibration, pre, aug, aug.copies * n, cs.spec.seed * 1000 + aug.seed)
    cs.calibration = np.concatenate([cs.calibration, copies]) if len(copies) else cs.calibration
    cs.shifted = augment_samples(cs.holdout, pre, aug, aug.shifted, cs.spec.seed * 1000 + aug.seed + 7919)
    return cs
