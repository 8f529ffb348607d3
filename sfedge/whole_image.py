"""A whole held-out image in every bundle, and its check on the device (`sfedge verify --whole-image`).

Parity on fixed-size crops says nothing about how windows are placed and
blended over an image bigger than the artifact's input.  So a build stores one
whole held-out image (raw, as a device app would read it: the right half of
the fundus photograph for ``fundus-demo``) and the fp32 torch model's *tiled*
output on it; on the device, each artifact runs the same tiling over the same
image and is held to the same parity metrics and tolerance as on the crops.

Numpy only: the build passes the torch model in as a predict function
(:func:`sfedge.models.tiled.torch_predictor`), and the check runs the
artifacts through their runners.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.registry import runner_for
from sfedge.bundle import Bundle, load_bundle
from sfedge.errors import BackendUnavailable, BundleError, SfedgeError
from sfedge.manifest import confined
from sfedge.parity import Tolerance, compare_outputs
from sfedge.preprocess import Preprocessing
from sfedge.tiling import Predict, Tiling, tiled_predict, window_count

__all__ = ["WHOLE_INPUT", "WHOLE_REFERENCE", "WHOLE_IMAGE_TILING", "store_whole_image", "check_whole_image",
           "readme_section"]

WHOLE_INPUT = "whole_image.npy"
WHOLE_REFERENCE = "whole_reference.npy"
# The tiling a bundle's whole-image reference is made with, and `sfedge predict`'s default for that bundle.
WHOLE_IMAGE_TILING = Tiling()


def store_whole_image(
    folder: str | Path,
    image: np.ndarray,
    preprocessing: Preprocessing,
    window: Sequence[int],
    predict: Predict,
    source: str,
    tiling: Tiling = WHOLE_IMAGE_TILING,
) -> dict[str, Any]:
    """Write ``image`` (raw H, W, C) and ``predict``'s tiled output on it into ``folder``; returns the manifest's
    ``whole_image`` entry (file names, tiling, preprocessing, window count, source)."""
    folder = Path(folder)
    x = preprocessing.apply(image)
    reference = tiled_predict(x[None], window, predict, tiling)[0]
    np.save(folder / WHOLE_INPUT, np.ascontiguousarray(image))
    np.save(folder / WHOLE_REFERENCE, reference.astype(np.float32))
    return {
        "input": WHOLE_INPUT, "reference": WHOLE_REFERENCE, "shape": list(image.shape), "dtype": str(image.dtype),
        "window": [int(w) for w in window], "windows": window_count(x.shape[1:], window, tiling),
        "tiling": tiling.as_dict(), "preprocessing": preprocessing.as_dict(), "source": source,
        "what": "one whole held-out image (raw) and the fp32 torch model's tiled output on it",
    }


def readme_section(manifest: dict[str, Any]) -> str:
    """The bundle README's paragraph on whole images (empty when the bundle has no whole-image reference)."""
    whole = manifest.get("whole_image")
    if not whole:
        return ""
    h, w = whole["window"]
    t = whole["tiling"]
    fixed = (manifest["model"].get("config") or {}).get("input_size")
    size_note = (f"The model has a fixed input size ({h}x{w}: its positional embedding and NMF windows fix it), "
                 f"so this bundle keeps {h}x{w} whatever the target's input size. " if fixed else "")
    return "\n".join([
        "", "## Whole images", "",
        f"{size_note}Images of any size are run in {h}x{w} windows (overlap {t['overlap']:g}, {t['mode']} blending, "
        f"as MONAI's sliding_window_inference) and blended back into one logit map:",
        "", "```",
        "sfedge predict . image.png -o out/       # out/image.mask.png and out/image.logits.npy",
        "sfedge verify . --whole-image            # the artifacts, tiled, against torch on a whole held-out image",
        "```", "",
        f"`{whole['input']}` ({whole['shape'][0]}x{whole['shape'][1]}, {whole['source']}) and `{whole['reference']}` "
        f"(the torch model's tiled output on it, {whole['windows']} windows) are what `--whole-image` checks.",
    ]) + "\n"


def check_whole_image(path: str | Path | Bundle, *, backend: str | None = None, threads: int | None = None,
                      tolerance: Tolerance | None = None) -> list:
    """Run every runnable artifact (or ``backend``'s) tiled over the bundle's whole image and compare with the
    stored torch reference under ``tolerance`` (``sfedge verify`` passes the one it applies: the installed
    target's, not the manifest's claim; default: the bundle's): one :class:`sfedge.verify.ArtifactCheck` each.

    BundleError when the bundle has no whole-image reference (built before it existed: rebuild it).
    """
    from sfedge.predict import bundle_window, tiled_logits
    from sfedge.verify import ArtifactCheck

    bundle = path if isinstance(path, Bundle) else load_bundle(path)
    whole = bundle.manifest.get("whole_image")
    if not whole:
        raise BundleError(f"bundle {bundle.path} has no whole-image reference", "rebuild it with this sfedge "
                          "(`sfedge build ... --force`) to add one")
    try:
        image = np.load(confined(bundle.path, whole["input"], "whole-image input"), allow_pickle=False)
        reference = np.load(confined(bundle.path, whole["reference"], "whole-image reference"), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {bundle.path} has an unreadable whole-image reference ({e})", "rebuild the bundle") from None
    x = Preprocessing.from_dict(whole["preprocessing"]).apply(image)
    tiling = Tiling.from_dict(whole["tiling"])
    window = bundle_window(bundle)
    tolerance = tolerance or bundle.tolerance
    checks = []
    for art in bundle.artifacts:
        if backend is not None and art.backend != backend:
            continue
        rel = f"{art.path.relative_to(bundle.path)} (whole image {image.shape[0]}x{image.shape[1]}, {whole['windows']} windows)"
        check = ArtifactCheck(art.backend, rel, art.precision, "skipped")
        checks.append(check)
        if art.kind == "device-folder":
            check.reason = "engine not built yet: run `sfedge build <bundle>` on the device"
            continue
        try:
            with runner_for(art.path, backend=art.backend, threads=threads or bundle.manifest["target"].get("threads")) as r:
                out = tiled_logits(r, x, window, tiling)
        except BackendUnavailable as e:
            check.reason = str(e)
            continue
        except SfedgeError:
            raise
        except Exception as e:  # a runtime that cannot run the file: the artifact is broken
            check.status, check.reason = "fail", f"runtime error: {e}".splitlines()[0]
            continue
        par = compare_outputs(reference[None], out[None]).as_dict()
        check.parity = par
        failures = tolerance.failures(par)
        check.status = "fail" if failures else "pass"
        check.reason = "; ".join(failures)
    return checks
