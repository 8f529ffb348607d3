"""Finish a TensorRT bundle on the device: build its engine there, check it, record it in the manifest.

Engines are tied to the TensorRT release and GPU that build them, so a Jetson
bundle leaves the workstation as a device-ready folder (ONNX, calibration
cache, trtexec script).  ``sfedge build <bundle>`` on the Jetson calls
:func:`complete_bundle`: it builds the engine with TensorRT (no torch needed),
checks its parity on the held-out inputs the bundle carries, and adds it to
the manifest with its hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sfedge.backends.tensorrt.folder import build_from_folder
from sfedge.backends.tensorrt.runner import TensorRTRunner
from sfedge.bundle import MANIFEST, hash_files, load_bundle
from sfedge.errors import BundleError
from sfedge.fileio import write_json
from sfedge.parity import gate, measure
from sfedge.progress import Progress

__all__ = ["complete_bundle"]


def complete_bundle(path: Path, *, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Build the engine of the bundle at ``path`` on this machine; returns a summary with a one-line message."""
    bundle = load_bundle(path)
    folders = [a for a in bundle.artifacts if a.kind == "device-folder"]
    if not folders:
        raise BundleError(f"bundle {path} has no TensorRT device folder to build",
                          "only bundles for TensorRT targets are completed on the device")
    engines = [a for a in bundle.artifacts if a.kind == "engine"]
    if engines and not force:
        return {"bundle": str(path), "engine": str(engines[0].path), "built": False,
                "message": f"{path}: engine already built ({engines[0].path.name}); --force rebuilds it"}
    engine = build_from_folder(folders[0].path, progress=progress)
    inputs, reference = bundle.reference()
    with TensorRTRunner(engine.path) as runner:
        parity = measure(runner, inputs, reference, bundle.task)
    engine.parity = gate(parity, bundle.tolerance, f"the TensorRT engine {engine.path.name}", cleanup=[engine.path])
    manifest = dict(bundle.manifest)
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["kind"] != "engine"] + [engine.as_dict(base=bundle.path)]
    manifest["files"] = hash_files(bundle.path)
    info = manifest["files"].get(manifest["artifacts"][-1]["path"], {})
    manifest["artifacts"][-1]["sha256"], manifest["artifacts"][-1]["size"] = info.get("sha256"), info.get("size")
    write_json(bundle.path / MANIFEST, manifest)
    return {"bundle": str(path), "engine": str(engine.path), "built": True, "parity": parity.as_dict(),
            "message": f"{path}: built {engine.path.name} with TensorRT {engine.meta.get('tensorrt')} on "
                       f"{engine.meta.get('gpu')}; {parity.summary()}"}
