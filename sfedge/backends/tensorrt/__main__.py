"""``python -m sfedge.backends.tensorrt FOLDER``: build a device folder's engine on the device.

For a Jetson with TensorRT's Python bindings, Polygraphy and numpy but no torch (and no
`sfedge build` wiring): reads the folder's build.json, checks the device's
TensorRT release and GPU, builds through the engine cache, prints one line.
"""

from __future__ import annotations

import argparse
import sys

from sfedge.backends.tensorrt.folder import build_from_folder
from sfedge.errors import SfedgeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfedge.backends.tensorrt", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the device folder written by `sfedge build` for a TensorRT target")
    parser.add_argument("--fallback", action="store_true",
                        help="build implicit INT8 from model.onnx + calibration.cache (TensorRT <= 10)")
    args = parser.parse_args(argv)
    def progress(message: str, fraction: float | None) -> None:
        print(f"  {message}", file=sys.stderr)

    try:
        artifact = build_from_folder(args.folder, use_fallback=args.fallback, progress=progress)
    except SfedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    cached = " (from the engine cache)" if artifact.meta.get("from_cache") else ""
    print(f"engine: {artifact.path} for TensorRT {artifact.meta['tensorrt']} on {artifact.meta['gpu']}{cached}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
