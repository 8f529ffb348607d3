"""Bundles: one folder per (model, target, precision) that says exactly what it is.

A bundle holds the artifact(s) for the target's backends, ``manifest.json``,
the held-out inputs and the fp32 torch reference outputs on them (so the device
can re-check parity without torch), and a short README for the device.  This
module reads and verifies bundles and needs only numpy (and the runtime that
runs the artifact); building lives in :mod:`sfedge.build`.

Manifest (schema ``sfedge-bundle/1``)::

    schema, sfedge_version, created (UTC ISO 8601), build_key (hash of every build input)
    model:       name, family, conv, s, config, weights_sha256, params, macs, preprocessing, source
    target:      the full target (backends, layout, threads, input size, tolerances, device facts)
    precision:   fp32 | fp16 | int8 | int8-dynamic
    calibration: name, sha256, samples, holdout
    toolchain:   versions of torch, onnx, onnxruntime, litert-torch, ... used to build
    artifacts:   [Artifact.as_dict() + sha256 + size] (paths relative to the bundle)
    reference:   {inputs: holdout_inputs.npy, outputs: holdout_reference.npy}
    files:       {relative path: {sha256, size}} for every file but the manifest
    origin:      {manifest: manifest.origin.json, sha256} once a device added its engine (sfedge.device_build)

A bundle is untrusted input (README: Security model): :func:`load_bundle`
reads at most :data:`~sfedge.manifest.MAX_MANIFEST_BYTES` of strict JSON and
validates it (:mod:`sfedge.manifest`), every path is resolved through
:func:`~sfedge.manifest.confined`, and :func:`check_files` fails on any file
the manifest does not list, on symlinks and on special files.  A malformed
bundle raises :class:`~sfedge.errors.MalformedBundleError` (exit code 3).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import Artifact
from sfedge.errors import BundleError, MalformedBundleError
from sfedge.fileio import read_json_bytes, read_limited, sha256_file
from sfedge.manifest import MAX_MANIFEST_BYTES, SCHEMA, confined, validate_manifest
from sfedge.parity import Tolerance, tolerance_for

__all__ = [
    "SCHEMA", "MANIFEST", "SIGNATURE", "ORIGIN", "ORIGIN_SIGNATURE", "RESERVED", "Bundle", "load_bundle", "is_bundle",
    "hash_files", "check_files", "FileCheck", "read_manifest",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"  # an SSH signature of manifest.json's bytes (sfedge.signing)
ORIGIN = "manifest.origin.json"  # the manifest as built, kept when a device adds its engine
ORIGIN_SIGNATURE = "manifest.origin.json.sig"
RESERVED = (MANIFEST, SIGNATURE, ORIGIN, ORIGIN_SIGNATURE)  # top-level files the manifest cannot list
_HINT = "give the folder `sfedge build` wrote, or rebuild the bundle"


@dataclass
class Bundle:
    """A bundle on disk: its folder and parsed manifest."""

    path: Path
    manifest: dict[str, Any]
    raw: bytes = b""  # manifest.json's bytes as read: what a signature covers

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def task(self) -> str:
        """What the model's output means (bundles from before tasks existed: binary)."""
        return str(self.manifest["model"].get("task") or "binary")

    @property
    def tolerance(self) -> Tolerance:
        """The parity tolerance the bundle's target sets for its precision."""
        return tolerance_for(self.manifest["target"].get("tolerances") or {}, self.precision)

    @property
    def artifacts(self) -> list[Artifact]:
        """The artifacts with their paths joined onto the bundle folder (each confined to it)."""
        out = []
        for a in self.manifest["artifacts"]:
            confined(self.path, a["path"], "artifact path")
            for f in a.get("files", []):
                confined(self.path, f, "artifact file")
            try:
                out.append(Artifact.from_dict(a, base=self.path))
            except (KeyError, TypeError, ValueError) as e:
                raise MalformedBundleError(f"{self.path / MANIFEST}: artifact {a.get('path')}: {e}", _HINT) from e
        return out

    def artifact(self, backend: str | None = None) -> Artifact:
        """The artifact for ``backend`` (default: the first one that has a runnable file)."""
        arts = self.artifacts
        if backend is None:
            runnable = [a for a in arts if a.kind != "device-folder"]
            if not runnable:
                raise BundleError(
                    f"bundle {self.path} has no runnable artifact (only a device-ready folder)",
                    "build the engine on the device first: sfedge build <bundle> on the Jetson",
                )
            return runnable[0]
        for a in arts:
            if a.backend == backend:
                return a
        raise BundleError(
            f"bundle {self.path} has no {backend} artifact",
            f"it has: {', '.join(a.backend for a in arts) or 'none'}",
        )

    @property
    def pair_key(self) -> str:
        """What must match for two bundles to be compared as SFConv vs vanilla: family, config sans conv, target, precision."""
        m = self.manifest["model"]
        cfg = {k: v for k, v in m.get("config", {}).items() if k not in ("conv", "s")}
        return json.dumps([m.get("family"), cfg, self.target_name, self.precision], sort_keys=True)

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(held-out inputs, fp32 torch outputs) stored in the bundle, as numpy arrays."""
        ref = self.manifest.get("reference") or {}
        try:
            inputs = confined(self.path, ref["inputs"], "reference inputs")
            outputs = confined(self.path, ref["outputs"], "reference outputs")
            return np.load(inputs, allow_pickle=False), np.load(outputs, allow_pickle=False)
        except (KeyError, OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path} has no readable reference data ({e})", "rebuild the bundle") from e

    def shifted_reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(shifted held-out inputs, fp32 torch outputs) when the bundle stores a shifted split, else None."""
        ref = (self.manifest.get("reference") or {}).get("shifted")
        if not ref:
            return None
        try:
            inputs = confined(self.path, ref["inputs"], "shifted reference inputs")
            outputs = confined(self.path, ref["outputs"], "shifted reference outputs")
            return np.load(inputs, allow_pickle=False), np.load(outputs, allow_pickle=False)
        except (KeyError, OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path} has unreadable shifted reference data ({e})", "rebuild the bundle") from e


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with a manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike[str], where: str | None = None) -> tuple[dict[str, Any], bytes]:
    """(validated manifest dict, its bytes) of one manifest file; MalformedBundleError (exit 3) otherwise."""
    raw = read_limited(path, MAX_MANIFEST_BYTES, MalformedBundleError, _HINT)
    doc = read_json_bytes(raw, path, MalformedBundleError, _HINT)
    validate_manifest(doc, where or path)
    return doc, raw  # type: ignore[return-value]


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and validate a bundle's manifest (MalformedBundleError, exit code 3, when it is not a sound bundle)."""
    p = Path(path)
    if not p.is_dir():
        raise MalformedBundleError(f"bundle {p} does not exist", "give the folder `sfedge build` wrote")
    mf = p / MANIFEST
    if not mf.is_file():
        raise MalformedBundleError(f"{p} is not a bundle (no {MANIFEST})", "give the folder `sfedge build` wrote; a "
                                   "folder ending in .part is an interrupted build and can be deleted")
    doc, raw = read_manifest(mf)
    return Bundle(p, doc, raw)


def _walk(folder: Path) -> list[tuple[str, Path, int]]:
    """(relative POSIX path, path, st_mode) of everything under ``folder`` but folders; symlinks are not followed."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            p = Path(root) / name
            mode = p.lstat().st_mode
            if not stat.S_ISDIR(mode):
                out.append((p.relative_to(folder).as_posix(), p, mode))
    return sorted(out)


def hash_files(folder: Path, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} for every regular file in ``folder`` but the top-level manifest files.

    ``only``: hash just these relative paths (what a device build adds).
    """
    out = {}
    for rel, p, mode in _walk(folder):
        if rel in RESERVED or not stat.S_ISREG(mode) or (only is not None and rel not in only):
            continue
        out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


@dataclass
class FileCheck:
    """Result of re-hashing a bundle's files against its manifest."""

    ok: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # files the manifest does not list: a FAIL
    unsafe: list[str] = field(default_factory=list)  # symlinks and special files: a FAIL

    @property
    def passed(self) -> bool:
        return bool(self.ok) and not (self.changed or self.missing or self.extra or self.unsafe)

    def problems(self) -> list[str]:
        """One phrase per failing file, for one-line errors."""
        return ([f"changed: {f}" for f in self.changed] + [f"missing: {f}" for f in self.missing]
                + [f"not in the manifest: {f}" for f in self.extra]
                + [f"symlink or special file: {f}" for f in self.unsafe])


def check_files(bundle: Bundle) -> FileCheck:
    """Re-hash every file the manifest lists; any changed, missing or unlisted file (or symlink) fails.

    Why unlisted files fail: a bundle is run from inside its folder, and a
    file nobody listed (a planted ``psutil.py``, a second model) is exactly
    what a hash list must not wave through.
    """
    listed: dict[str, dict[str, Any]] = bundle.manifest.get("files", {})
    result = FileCheck()
    for rel, info in listed.items():
        f = confined(bundle.path, rel, "file")
        try:
            st = f.lstat()
        except OSError:
            result.missing.append(rel)
            continue
        if not stat.S_ISREG(st.st_mode):
            result.unsafe.append(rel)
        elif st.st_size != info["size"] or sha256_file(f) != info["sha256"]:
            result.changed.append(rel)
        else:
            result.ok.append(rel)
    for rel, _, mode in _walk(bundle.path):
        if rel in RESERVED or rel in listed:
            continue
        (result.extra if stat.S_ISREG(mode) else result.unsafe).append(rel)
    return result
