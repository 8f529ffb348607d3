"""Finish a TensorRT bundle on the device: verify it, build its engine there, check it, record it in the manifest.

Engines are tied to the TensorRT release and GPU that build them, so a Jetson
bundle leaves the workstation as a device-ready folder (ONNX, calibration
cache, trtexec script).  ``sfedge build <bundle>`` on the Jetson calls
:func:`complete_bundle`, which trusts nothing it has not checked:

1. the bundle is verified first (every file against the manifest, no
   unlisted file, the manifest's schema and paths, the signature where one is
   required): a changed bundle is refused before TensorRT or the GPU probe runs;
2. the engine and timing cache go where the device folder's ``build.json``
   says, which must be inside that folder (:func:`read_plan` confines it);
3. the engine is built (no torch needed) and gated on the held-out inputs;
4. the new manifest is the one first built (kept as ``manifest.origin.json``,
   with its signature) plus the engine artifact and the files the build added
   inside the device folder, nothing else; ``sfedge verify`` checks exactly
   that derivation.  Builds of one bundle are serialized by a lock.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfedge import __version__
from sfedge.backends.tensorrt.folder import build_from_folder
from sfedge.backends.tensorrt.runner import TensorRTRunner
from sfedge.bundle import MANIFEST, ORIGIN, ORIGIN_SIGNATURE, SIGNATURE, Bundle, hash_files, load_bundle, read_manifest
from sfedge.errors import BundleError
from sfedge.fileio import atomic_path, locked, sha256_bytes, write_json
from sfedge.parity import gate, measure
from sfedge.progress import Progress
from sfedge.signing import sign_bytes
from sfedge.verify import ensure_verified, verify_bundle

__all__ = ["complete_bundle"]


def complete_bundle(path: Path, *, force: bool = False, progress: Progress | None = None,
                    allowed_signers: str | None = None, require_signature: bool = False,
                    sign: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Build the engine of the bundle at ``path`` on this machine; returns a summary with a one-line message.

    ``allowed_signers`` / ``require_signature`` as for ``sfedge verify``;
    ``sign`` signs the completed manifest with this device's key.
    """
    path = Path(path)
    with locked(path):
        report = verify_bundle(path, files_only=True, allowed_signers=allowed_signers,
                               require_signature=require_signature)
        ensure_verified(report, "the on-device engine build")
        tolerance = report.tolerance.tolerance if report.tolerance else None  # the installed target's, as verify
        bundle = load_bundle(path)
        if not [a for a in bundle.artifacts if a.kind == "device-folder"]:
            raise BundleError(f"bundle {path} has no TensorRT device folder to build",
                              "only bundles for TensorRT targets are completed on the device")
        engines = [a for a in bundle.artifacts if a.kind == "engine"]
        if engines and not force:
            return {"bundle": str(path), "engine": str(engines[0].path), "built": False,
                    "message": f"{path}: engine already built ({engines[0].path.name}); --force rebuilds it"}
        base = _origin(bundle)  # the manifest as first built: what this build adds to
        folder = next(a for a in base.artifacts if a.kind == "device-folder")
        engine = build_from_folder(folder.path, progress=progress)
        inputs, reference = base.reference()
        with TensorRTRunner(engine.path) as runner:
            parity = measure(runner, inputs, reference, base.task)
        engine.parity = gate(parity, tolerance or base.tolerance, f"the TensorRT engine {engine.path.name}",
                             cleanup=[engine.path])
        manifest = _completed(base, folder.path, engine)
        _write(base, manifest, sign, first=base is bundle)
    return {"bundle": str(path), "engine": str(engine.path), "built": True, "parity": parity.as_dict(),
            "message": f"{path}: built {engine.path.name} with TensorRT {engine.meta.get('tensorrt')} on "
                       f"{engine.meta.get('gpu')}; {parity.summary()}"}


def _origin(bundle: Bundle) -> Bundle:
    """The bundle as its first manifest describes it (itself, when no device has completed it yet)."""
    if bundle.manifest.get("origin") is None:
        return bundle
    doc, raw = read_manifest(bundle.path / ORIGIN)
    return Bundle(bundle.path, doc, raw)


def _completed(base: Bundle, folder: Path, engine: Any) -> dict[str, Any]:
    """``base``'s manifest plus the engine artifact and the files the build added in the device folder."""
    root = base.path
    listed = base.manifest["files"]
    added = sorted(rel for rel in (p.relative_to(root).as_posix() for p in folder.rglob("*")
                                   if p.is_file() and not p.is_symlink())
                   if rel not in listed)
    files = {**listed, **hash_files(root, only=added)}
    art = engine.as_dict(base=root)
    entry = files[art["path"]]
    art["sha256"], art["size"] = entry["sha256"], entry["size"]
    manifest = dict(base.manifest)
    manifest["artifacts"] = [*base.manifest["artifacts"], art]
    manifest["files"] = files
    manifest["origin"] = {"manifest": ORIGIN, "sha256": sha256_bytes(base.raw)}
    manifest["device_build"] = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "sfedge_version": __version__,
                                "added": sorted(added), "tensorrt": engine.meta.get("tensorrt"),
                                "gpu": engine.meta.get("gpu")}
    return manifest


def _write(base: Bundle, manifest: dict[str, Any], sign: str | os.PathLike[str] | None, first: bool) -> None:
    """Keep the first manifest and its signature, then write the new manifest (each step atomic and fsynced).

    ``first``: the bundle was not completed before, so its manifest.json (and
    signature) become the origin; otherwise the origin is already in place.
    """
    root = base.path
    if first:
        with atomic_path(root / ORIGIN) as tmp:
            tmp.write_bytes(base.raw)
        if (root / SIGNATURE).is_file():
            with atomic_path(root / ORIGIN_SIGNATURE) as tmp:
                shutil.copyfile(root / SIGNATURE, tmp)
        else:
            (root / ORIGIN_SIGNATURE).unlink(missing_ok=True)
    write_json(root / MANIFEST, manifest)
    (root / SIGNATURE).unlink(missing_ok=True)  # it signed the first manifest, kept as ORIGIN_SIGNATURE
    if sign is not None:
        signature = sign_bytes((root / MANIFEST).read_bytes(), sign)
        with atomic_path(root / SIGNATURE) as tmp:
            tmp.write_bytes(signature)
