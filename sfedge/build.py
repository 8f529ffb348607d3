"""Build bundles: a model and a target in, one checked, self-describing folder out.

``build_bundle`` resolves the model (a checkpoint path, or a registry name for
an untrained model), loads the calibration set at the model's input size, asks
each of the target's backends that supports the precision to ``make`` its
artifact (each checks parity against torch on the held-out split), stores the
held-out inputs and the torch reference outputs for re-checking on the device,
and writes ``manifest.json`` and a README.  The folder is assembled under a
temporary name and renamed into place, and a bundle whose inputs have not
changed is not rebuilt.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sfedge import __version__
from sfedge.artifact import Artifact
from sfedge.backends.maker import maker
from sfedge.backends.registry import BACKENDS
from sfedge.bundle import MANIFEST, SCHEMA, SIGNATURE, Bundle, check_files, hash_files, load_bundle
from sfedge.calibration import CalibrationSet, load_calibration
from sfedge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, weights_sha256
from sfedge.errors import CalibrationError, CheckpointError, ConfigError, OutputFolderError, SfedgeError
from sfedge.fileio import atomic_dir, atomic_path, locked, sfedge_code_sha256, sha256_bytes, write_json, write_text
from sfedge.models import create_model, input_shape, list_models, model_entry
from sfedge.nn import count_macs, count_params, factorize, fold
from sfedge.progress import Progress, scaled
from sfedge.signing import sign_bytes
from sfedge.source import ModelSource
from sfedge.targets import Target, load_target

__all__ = [
    "BuildResult", "build_bundle", "resolve_model", "factorize_checkpoint", "toolchain_versions", "bundle_name",
]

TOOLCHAIN_PACKAGES = (
    "torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "litert-torch", "ai-edge-quantizer", "ai-edge-litert",
    "polygraphy", "tensorrt", "numpy",
)


@dataclass
class BuildResult:
    """What ``build_bundle`` did: the bundle folder, and whether it was already up to date."""

    path: Path
    cached: bool
    bundle: Bundle
    seconds: float

    def summary(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {
            "bundle": str(self.path), "cached": self.cached, "model": m["model"]["name"], "target": m["target"]["name"],
            "precision": m["precision"], "seconds": round(self.seconds, 1),
            "artifacts": [
                {"backend": a["backend"], "kind": a["kind"], "size": a.get("size"), "parity": a.get("parity", {}),
                 "float_layers": len(a.get("float_layers", []))}
                for a in m["artifacts"]
            ],
        }


def toolchain_versions() -> dict[str, str]:
    """Installed versions of every package that can take part in a build."""
    out = {"sfedge": __version__}
    for pkg in TOOLCHAIN_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def resolve_model(model: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint path, or a registry name (an *untrained* model, flagged in its metrics)."""
    p = Path(model)
    if p.suffix == ".safetensors" or p.exists():
        return load_checkpoint(p)
    if str(model) not in list_models() and (os.sep in str(model) or "." in str(model)):
        raise CheckpointError(f"checkpoint {p} does not exist", "give an existing .safetensors file or a model name")
    m = create_model(str(model)).eval()  # raises UnknownNameError listing valid names
    state = m.state_dict()
    return Checkpoint(model=m, name=str(model), config=dict(m.sfedge_config), weights_sha256=weights_sha256(state),
                      preprocessing=None, metrics={"untrained": True}, path=None)


def bundle_name(ckpt: Any, target: Target, precision: str) -> str:
    """``<model label>__<target>__<precision>``; the label is the checkpoint's stem or the registry name."""
    label = Path(ckpt.path).stem if ckpt.path is not None else ckpt.name
    return f"{label}__{target.name}__{precision}"


def _family(name: str) -> str:
    return name.removesuffix("-sfconv")


def _build_key(source: ModelSource, target: Target, precision: str, calib: CalibrationSet, tools: dict[str, str]) -> str:
    t = target.as_dict()
    t.pop("path", None)
    payload = {"model": source.metadata(), "target": t, "precision": precision, "calibration": calib.sha256, "tools": tools,
               "code": sfedge_code_sha256()}
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())


def build_bundle(
    model: str | os.PathLike[str],
    target: str | Target,
    precision: str | None = None,
    *,
    calibration: str | os.PathLike[str] = "fundus-demo",
    out_dir: str | os.PathLike[str] = "bundles",
    force: bool = False,
    progress: Progress | None = None,
    sign: str | os.PathLike[str] | None = None,
) -> BuildResult:
    """Build (or reuse) the bundle for (model, target, precision) under ``out_dir``.

    Errors (unknown target or precision, corrupt checkpoint, bad calibration
    set, parity failure) leave no bundle folder behind.  ``sign``: an SSH key
    that signs the manifest (``manifest.json.sig``, :mod:`sfedge.signing`).
    Concurrent builds of one bundle wait for each other; the cache is used
    only when the existing bundle verifies in full (files and manifest).
    """
    start = time.perf_counter()
    say = progress or (lambda message, fraction=None: None)
    tgt = target if isinstance(target, Target) else load_target(target)
    prec = tgt.check_precision(precision or tgt.default_precision)
    say("loading model", 0.02)
    ckpt = resolve_model(model)
    source = ModelSource.from_checkpoint(ckpt, tgt.input_size)
    say("loading calibration set", 0.05)
    calib = load_calibration(calibration, size=source.input_shape[2:])
    if calib.shape[0] != source.input_shape[1]:
        raise CalibrationError(
            f"calibration set '{calib.name}' gives {calib.shape[0]}-channel samples but {ckpt.name} takes "
            f"{source.input_shape[1]} channels", "use a calibration spec whose [preprocessing] channels match the model",
        )
    if ckpt.preprocessing is not None and ckpt.preprocessing.as_dict() != calib.spec.preprocessing.as_dict():
        raise CalibrationError(
            f"calibration set '{calib.name}' preprocesses differently from how {ckpt.name} was trained "
            f"({calib.spec.preprocessing.as_dict()} vs {ckpt.preprocessing.as_dict()})",
            "use a calibration spec with the model's mean/std",
        )
    backends = [b for b in tgt.backends if prec in BACKENDS[b].precisions]
    tools = toolchain_versions()
    key = _build_key(source, tgt, prec, calib, tools)
    dest = Path(out_dir) / bundle_name(ckpt, tgt, prec)
    with locked(dest):  # a second build of the same bundle waits here, then finds it up to date
        cached = None if force else _up_to_date(dest, key, sign)
        if cached is not None:
            say("up to date", 1.0)
            return BuildResult(dest, True, cached, time.perf_counter() - start)
        if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()
                                      or (not (dest / MANIFEST).is_file() and any(dest.iterdir()))):
            # Only a bundle (a folder with a manifest) is ever replaced: never a folder of the user's own files.
            raise OutputFolderError(f"{dest} exists and is not a bundle", "move it away or choose another -o")
        return _build(ckpt, source, tgt, prec, calib, tools, key, backends, dest, sign, say, start)


def _up_to_date(dest: Path, key: str, sign: str | os.PathLike[str] | None) -> Bundle | None:
    """The existing bundle at ``dest`` if it was built from ``key`` and still verifies in full (files and manifest)."""
    if not (dest / MANIFEST).is_file():
        return None
    try:
        existing = load_bundle(dest)
    except SfedgeError:  # an unreadable or malformed old bundle is simply rebuilt
        return None
    if existing.manifest.get("build_key") != key or not check_files(existing).passed:
        return None
    if sign is not None and not (dest / SIGNATURE).is_file():
        return None  # asked for a signed bundle: sign it (rebuild) rather than hand back an unsigned one
    return existing


def _build(ckpt: Checkpoint, source: ModelSource, tgt: Target, prec: str, calib: CalibrationSet, tools: dict[str, str],
           key: str, backends: list[str], dest: Path, sign: str | os.PathLike[str] | None, say: Progress,
           start: float) -> BuildResult:
    hold_in = calib.holdout
    hold_ref = source.reference(hold_in)
    with atomic_dir(dest) as tmp:
        artifacts: list[Artifact] = []
        for i, b in enumerate(backends):
            say(f"{b} {prec}", 0.1 + 0.8 * i / len(backends))
            sub = scaled(say, 0.1 + 0.8 * i / len(backends), 0.8 / len(backends), b)
            artifacts.append(maker(b)(source, tgt, prec, calib, tmp, progress=sub))
        say("writing manifest", 0.95)
        np.save(tmp / "holdout_inputs.npy", hold_in)
        np.save(tmp / "holdout_reference.npy", hold_ref)
        manifest = _manifest(ckpt, source, tgt, prec, calib, tools, key, artifacts, tmp, count_params(ckpt.model),
                             count_macs(ckpt.model, source.input_shape))
        write_text(tmp / "README.md", _readme(manifest))
        manifest["files"] = hash_files(tmp)
        for a in manifest["artifacts"]:
            info = manifest["files"].get(a["path"])
            a["sha256"], a["size"] = (info["sha256"], info["size"]) if info else (None, _dir_size(tmp / a["path"]))
        write_json(tmp / MANIFEST, manifest)
        if sign is not None:
            say("signing the manifest", 0.98)
            signature = sign_bytes((tmp / MANIFEST).read_bytes(), sign)
            with atomic_path(tmp / SIGNATURE) as sig:
                sig.write_bytes(signature)
    say("done", 1.0)
    return BuildResult(dest, False, load_bundle(dest), time.perf_counter() - start)


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _manifest(ckpt: Any, source: ModelSource, target: Target, precision: str, calib: CalibrationSet,
              tools: dict[str, str], key: str, artifacts: list[Artifact], root: Path, params: int, macs: int) -> dict:
    t = target.as_dict()
    t.pop("path", None)
    return {
        "schema": SCHEMA,
        "sfedge_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_key": key,
        "model": {
            "name": ckpt.name, "family": _family(ckpt.name), "conv": ckpt.config.get("conv"), "s": ckpt.config.get("s"),
            "config": ckpt.config, "weights_sha256": ckpt.weights_sha256, "params": params, "macs": macs,
            "input_shape": list(source.input_shape), "preprocessing": source.preprocessing,
            "source": str(ckpt.path) if ckpt.path else f"registry:{ckpt.name} (untrained)",
            "metrics": ckpt.metrics,
        },
        "target": t,
        "precision": precision,
        "calibration": {"name": calib.name, "sha256": calib.sha256, "samples": len(calib.calibration),
                        "holdout": len(calib.holdout), "source": calib.files[:3]},
        "toolchain": tools,
        "artifacts": [a.as_dict(base=root) for a in artifacts],
        "reference": {"inputs": "holdout_inputs.npy", "outputs": "holdout_reference.npy",
                      "what": "held-out calibration samples and the fp32 torch model's outputs on them"},
    }


def _readme(m: dict) -> str:
    model, target = m["model"], m["target"]
    lines = [
        f"# {model['name']} for {target['name']} ({m['precision']})",
        "",
        f"Built by sfedge {m['sfedge_version']} on {m['created']}. Target: {target['description']}.",
        f"Model weights sha256 {model['weights_sha256'][:16]}..., {model['params']:,} parameters, "
        f"{model['macs'] / 1e9:.2f} GMAC per inference at input {model['input_shape']}.",
        "",
        "## Artifacts",
        "",
        "| backend | file | precision | parity vs torch (held-out) | layers kept float |",
        "|---|---|---|---|---|",
    ]
    for a in m["artifacts"]:
        par = a.get("parity") or {}
        ptxt = ", ".join(f"{k} {par[k]:.4g}" for k in ("max_abs", "cosine", "dice_agreement") if k in par) or "-"
        lines.append(f"| {a['backend']} | `{a['path']}` | {a['precision']} | {ptxt} | {len(a.get('float_layers', []))} |")
    inp = m["artifacts"][0]["inputs"][0] if m["artifacts"] and m["artifacts"][0]["inputs"] else None
    pre = model.get("preprocessing") or {}
    lines += ["", "## Input", ""]
    if inp:
        lines.append(f"`{inp['name']}`: shape {inp['shape']}, {inp['dtype']}, layout {inp['layout']}"
                     + (f", quantized: real = {inp['scale']:.6g} * (q - {inp['zero_point']})" if inp.get("scale") else ""))
    if pre:
        lines.append(f"Preprocessing: image / 255, then (x - mean) / std with mean {pre.get('mean')} and std {pre.get('std')} "
                     f"({pre.get('channels')} channels). The output is a logit map: vessel where logit > 0.")
    notes = [n for a in m["artifacts"] for n in a.get("notes", [])]
    lines += [
        "", "## On the device", "",
        "```",
        "pip install 'sfedge[runtime]'        # numpy, rich, psutil, onnxruntime, ai-edge-litert; no torch",
        "sfedge verify .                      # re-hash every file, re-check parity on the stored held-out inputs",
        "sfedge profile .                     # latency and memory (add --pair <vanilla bundle> for SFConv vs vanilla)",
        "```",
    ]
    if any(a["kind"] == "device-folder" for a in m["artifacts"]):
        lines += ["", "The TensorRT engine is built on the device (engines are tied to the GPU and TensorRT version):",
                  "`sfedge build .` there, or run the `build_engine.sh` script in the TensorRT folder."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def factorize_checkpoint(ckpt_path: str | os.PathLike[str], s: float, out_path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """A checkpoint's kxk convs -> SFConv2d at ratio ``s`` by truncated SVD, saved as a new checkpoint.

    The result is rebuildable by name: ``<family>-sfconv`` with ``s`` in its
    config (the registry builds exactly the layers ``factorize`` produces).
    Returns the new path and the per-layer FactorizeReport.
    """
    ck = load_checkpoint(ckpt_path)
    entry = model_entry(ck.name)
    if "conv" not in entry.defaults:
        raise ConfigError(f"model '{ck.name}' has no conv setting, so its factorized form has no registry name",
                          "factorize models built with the conv factory (unet, factorizer)")
    model = ck.model
    if ck.config.get("conv") == "sfconv":  # re-rank an SFConv model: fold to dense first
        fold(model)
    report = factorize(model, s=s, input_shape=input_shape(ck.config))
    sf_name = f"{_family(ck.name)}-sfconv"
    name = sf_name if sf_name in list_models() else ck.name
    config = {**ck.config, "conv": "sfconv", "s": s}
    rebuilt = create_model(name, **config)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"factorized '{ck.name}' does not match the registry's '{name}' layout: {e}") from e
    metrics = {"factorized_from": str(ckpt_path), "from_weights_sha256": ck.weights_sha256, "s": s,
               "mac_reduction": report.mac_reduction}
    save_checkpoint(rebuilt, out_path, preprocessing=ck.preprocessing, metrics=metrics)
    return Path(out_path), report
