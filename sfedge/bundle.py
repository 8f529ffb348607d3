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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import Artifact
from sfedge.errors import BundleError
from sfedge.fileio import read_schema_json, sha256_file
from sfedge.parity import Tolerance, tolerance_for

__all__ = ["SCHEMA", "MANIFEST", "Bundle", "load_bundle", "is_bundle", "hash_files", "FileCheck"]

SCHEMA = "sfedge-bundle/1"
MANIFEST = "manifest.json"


@dataclass
class Bundle:
    """A bundle on disk: its folder and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

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
        """The artifacts with absolute paths."""
        return [Artifact.from_dict(a, base=self.path) for a in self.manifest["artifacts"]]

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
            return np.load(self.path / ref["inputs"]), np.load(self.path / ref["outputs"])
        except (KeyError, OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path} has no readable reference data ({e})", "rebuild the bundle") from e

    def shifted_reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(shifted held-out inputs, fp32 torch outputs) when the bundle stores a shifted split, else None."""
        ref = (self.manifest.get("reference") or {}).get("shifted")
        if not ref:
            return None
        try:
            return np.load(self.path / ref["inputs"]), np.load(self.path / ref["outputs"])
        except (KeyError, OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path} has unreadable shifted reference data ({e})", "rebuild the bundle") from e


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with a manifest."""
    return (Path(path) / MANIFEST).is_file()


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle's manifest (BundleError when the folder is not a complete bundle)."""
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"bundle {p} does not exist", "give the folder `sfedge build` wrote")
    mf = p / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{p} is not a bundle (no {MANIFEST})", "give the folder `sfedge build` wrote; a folder "
                          "ending in .part is an interrupted build and can be deleted")
    return Bundle(p, read_schema_json(mf, SCHEMA, BundleError, "rebuild the bundle"))


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} for every file in ``folder`` except the manifest."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            out[str(f.relative_to(folder))] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    return out


@dataclass
class FileCheck:
    """Result of re-hashing a bundle's files against its manifest."""

    ok: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (self.changed or self.missing)


def check_files(bundle: Bundle) -> FileCheck:
    """Re-hash every file the manifest lists; report changed, missing and unexpected files."""
    listed: dict[str, dict[str, Any]] = bundle.manifest.get("files", {})
    result = FileCheck()
    for rel, info in listed.items():
        f = bundle.path / rel
        if not f.is_file():
            result.missing.append(rel)
        elif f.stat().st_size != info["size"] or sha256_file(f) != info["sha256"]:
            result.changed.append(rel)
        else:
            result.ok.append(rel)
    for f in bundle.path.rglob("*"):
        rel = str(f.relative_to(bundle.path))
        if f.is_file() and f.name != MANIFEST and rel not in listed:
            result.extra.append(rel)
    return result
