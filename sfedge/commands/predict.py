"""`sfedge predict`: masks and logits for whole images through a bundle (runs on the device, no torch)."""

from __future__ import annotations

import argparse

from sfedge.console import console, print_json, progress_bar, table
from sfedge.tiling import BLEND_MODES, PADDING_MODES

EPILOG = """examples:
  sfedge predict bundles/unet-sfconv__host-cpu__int8 fundus.png -o masks/
  sfedge predict . scans/*.png -o out --backend tflite --overlap 0.5      (inside a bundle on the device)
  sfedge predict BUNDLE retina.jpg -o out --scale 0.5       the demo models saw the photograph at half size

Each IMAGE (PNG, JPEG, TIFF, BMP or NPY, any size) is preprocessed with the bundle's recorded
mean/std, covered with windows of the bundle's input size (overlap and Gaussian blending as
MONAI's sliding_window_inference; defaults: what the bundle's whole-image reference used), run
through the bundle's first artifact whose runtime is installed, and written as
OUT/<stem>.mask.png (255 = foreground, or labels for several classes) and
OUT/<stem>.logits.npy (float32, classes x height x width). Every image is checked before the
first one runs; each output file is written atomically."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (written by `sfedge build`)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("-o", "--out", required=True, help="folder for the masks and logits")
    p.add_argument("--backend", help="use this artifact of the bundle (default: the first that runs here)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the target's)")
    p.add_argument("--overlap", type=float, help="fraction of a window shared with its neighbours, in [0, 1)")
    p.add_argument("--mode", choices=BLEND_MODES, help="blending of overlapping windows")
    p.add_argument("--sigma-scale", type=float, help="gaussian sigma as a fraction of the window")
    p.add_argument("--padding-mode", choices=tuple(PADDING_MODES), help="padding of images smaller than a window")
    p.add_argument("--batch", type=int, help="windows per inference call (artifacts with a static batch > 1)")
    p.add_argument("--scale", type=float, default=1.0, help="resize images by this factor first (logits come back "
                   "at the image's size)")
    p.add_argument("--threshold", type=float, default=0.0, help="logit threshold of the mask (0: probability 0.5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sfedge.bundle import load_bundle
    from sfedge.predict import bundle_tiling, bundle_window, predict_files

    bundle = load_bundle(args.bundle)
    tiling = bundle_tiling(bundle, overlap=args.overlap, mode=args.mode, sigma_scale=args.sigma_scale,
                           padding_mode=args.padding_mode, batch=args.batch)
    with progress_bar("predict", enabled=not args.json) as bar:
        results = predict_files(bundle, args.images, args.out, tiling=tiling, backend=args.backend,
                                threads=args.threads, scale=args.scale, threshold=args.threshold, progress=bar)
    if args.json:
        print_json({"bundle": str(bundle.path), "window": list(bundle_window(bundle)), "tiling": tiling.as_dict(),
                    "images": [r.as_dict() for r in results]})
        return 0
    h, w = bundle_window(bundle)
    console.print(table(f"predict with {bundle.path.name} (windows {h}x{w}, overlap {tiling.overlap:g}, {tiling.mode})",
                        ["image", "size", "windows", "foreground", "seconds", "mask", "logits"],
                        [[r.image, f"{r.shape[1]}x{r.shape[2]}", r.windows, f"{r.foreground:.1%}", r.seconds, r.mask,
                          r.logits] for r in results]))
    return 0
