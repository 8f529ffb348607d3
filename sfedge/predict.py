"""Whole images through a bundle, on the device: the manifest's preprocessing, the artifact's runner, tiled inference.

A bundle's artifacts have a static input (256x256 on host and phone, 512x512
on Jetson, the Factorizer's own 128x128), so an image of any size is covered
with windows of that size (:mod:`sfedge.tiling`) and the window outputs are
blended back into one logit map.  Needs numpy, the artifact's runtime and
Pillow for PNG/JPEG/TIFF (all in ``sfedge[runtime]``); no torch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.registry import runner_for
from sfedge.bundle import Bundle
from sfedge.errors import BackendUnavailable, BundleError, ConfigError
from sfedge.images import fit_channels, read_image, resize, write_npy, write_png
from sfedge.preprocess import Preprocessing
from sfedge.tiling import Tiling, runner_predictor, tiled_predict, window_count

__all__ = [
    "PredictResult", "bundle_window", "bundle_preprocessing", "bundle_tiling", "open_runner", "tiled_logits",
    "mask_from_logits", "predict_files", "output_names",
]


@dataclass
class PredictResult:
    """One image through the bundle: where the outputs went and what the mask holds."""

    image: str
    mask: str
    logits: str
    shape: list[int]  # logits (K, H, W)
    windows: int
    seconds: float
    foreground: float  # fraction of mask pixels > 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bundle_window(bundle: Bundle) -> tuple[int, int]:
    """(H, W) of the bundle's static input: the window size of tiled inference."""
    shape = bundle.manifest["model"].get("input_shape")
    if not shape or len(shape) != 4:
        raise BundleError(f"bundle {bundle.path} does not record its input shape", "rebuild it with this sfedge")
    return int(shape[2]), int(shape[3])


def bundle_preprocessing(bundle: Bundle) -> Preprocessing:
    """How images become model input: the model's recorded preprocessing, else the calibration set's (recorded
    with the whole-image reference), else scaling to [0, 1] only (an untrained registry model)."""
    m = bundle.manifest
    spec = m["model"].get("preprocessing") or (m.get("whole_image") or {}).get("preprocessing")
    if spec:
        return Preprocessing.from_dict(spec)
    c = int(m["model"]["input_shape"][1])
    return Preprocessing(channels=c, mean=(0.0,) * c, std=(1.0,) * c)


def bundle_tiling(bundle: Bundle, **overrides: Any) -> Tiling:
    """The tiling the bundle's whole-image reference was made with (else the defaults), with ``overrides``
    (None values ignored) applied."""
    base = (bundle.manifest.get("whole_image") or {}).get("tiling") or {}
    return Tiling.from_dict({**base, **{k: v for k, v in overrides.items() if v is not None}})


@contextlib.contextmanager
def open_runner(bundle: Bundle, backend: str | None = None, threads: int | None = None) -> Iterator[Any]:
    """A loaded runner for the bundle's first artifact whose runtime is installed here (or for ``backend``).

    BundleError when the bundle has no runnable artifact (only a TensorRT device folder) or when no
    artifact's runtime is available here, naming each reason.
    """
    arts = [bundle.artifact(backend)] if backend else [a for a in bundle.artifacts if a.kind != "device-folder"]
    if not arts:
        bundle.artifact()  # raises the bundle's "no runnable artifact" error with its hint
    threads = threads or bundle.manifest["target"].get("threads")
    reasons = []
    for art in arts:
        if art.kind == "device-folder":
            reasons.append(f"{art.backend}: engine not built yet")
            continue
        runner = runner_for(art.path, backend=art.backend, threads=threads)
        try:
            runner.__enter__()
        except BackendUnavailable as e:
            reasons.append(f"{art.backend}: {e.message}")
            continue
        try:
            yield runner
        finally:
            runner.__exit__(None, None, None)
        return
    raise BundleError(f"bundle {bundle.path} has no artifact that runs here ({'; '.join(reasons)})",
                      "install the runtime (pip install 'sfedge[runtime]') or, for TensorRT, build the engine "
                      "on the device with `sfedge build <bundle>`")


def tiled_logits(runner: Any, image: np.ndarray, window: Sequence[int], tiling: Tiling,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One preprocessed (C, H, W) float32 image through ``runner`` in windows: (K, H, W) float32 logits."""
    predict, static = runner_predictor(runner)
    if tiling.batch % static:  # a static-batch artifact runs whole batches; round the tiling batch up to them
        tiling = Tiling.from_dict({**tiling.as_dict(), "batch": static * -(-tiling.batch // static)})
    return tiled_predict(image[None], window, predict, tiling, progress=progress)[0]


def mask_from_logits(logits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """uint8 (H, W) mask: 255 where the single logit exceeds ``threshold``, or the argmax label for K > 1."""
    if logits.shape[0] == 1:
        return np.where(logits[0] > threshold, 255, 0).astype(np.uint8)
    return np.argmax(logits, axis=0).astype(np.uint8)


def output_names(images: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The output stem per image (its file stem); ConfigError when two images would write the same files."""
    stems = [Path(p).stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ConfigError(f"several images are named {', '.join(dup)}: their outputs would overwrite each other",
                          "predict them in separate calls with different -o folders, or rename them")
    return stems


def predict_files(
    bundle: Bundle,
    images: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    tiling: Tiling,
    backend: str | None = None,
    threads: int | None = None,
    scale: float = 1.0,
    threshold: float = 0.0,
    progress: Callable[[str, float | None], None] | None = None,
) -> list[PredictResult]:
    """Each image -> ``<stem>.mask.png`` (uint8: 255 = foreground) and ``<stem>.logits.npy`` ((K, H, W) float32
    at the image's own resolution) in ``out_dir``, each written atomically.

    Every image is read and checked (exists, decodes, channel count) before the first one runs, so a bad
    path fails before any output is written.  ``scale`` resizes the image before inference (models trained
    at another resolution) and the logits back to the image's size.
    """
    if not scale > 0:
        raise ConfigError(f"--scale must be > 0, got {scale}", "e.g. --scale 0.5 for half resolution")
    pre = bundle_preprocessing(bundle)
    window = bundle_window(bundle)
    names = output_names(images)
    for path in images:  # fail on any bad image before writing anything
        fit_channels(read_image(path), pre.channels, path)
    out = Path(out_dir)
    say = progress or (lambda message, fraction=None: None)
    results = []
    with open_runner(bundle, backend, threads) as runner:
        for i, (path, stem) in enumerate(zip(images, names)):
            start = time.perf_counter()
            raw = fit_channels(read_image(path), pre.channels, path)
            h, w = raw.shape[:2]
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = pre.apply(resize(raw, size) if size != (h, w) else raw)
            total = window_count(x.shape[1:], window, tiling)

            def step(done: int, n: int, i: int = i, name: str = Path(path).name) -> None:
                say(f"{name}: window {done}/{n}", (i + done / n) / len(images))

            logits = tiled_logits(runner, x, window, tiling, step)
            if size != (h, w):
                logits = np.moveaxis(resize(np.moveaxis(logits, 0, -1), (h, w)), -1, 0)
            mask = mask_from_logits(logits, threshold)
            mask_path = write_png(out / f"{stem}.mask.png", mask)
            logits_path = write_npy(out / f"{stem}.logits.npy", logits.astype(np.float32))
            results.append(PredictResult(str(path), str(mask_path), str(logits_path), list(logits.shape), total,
                                         time.perf_counter() - start, float((mask > 0).mean())))
    return results
