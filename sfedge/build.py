"""Build bundles: a model and a target in, one checked, self-describing folder out.

``build_bundle`` resolves the model (anything :func:`sfedge.source.resolve_model`
takes, or an ``nn.Module``), loads the calibration set at the model's input
size, asks each of the target's backends that supports the precision to
``make`` its artifact (each gates its parity against torch on the held-out
split with the task's metric), stores the held-out inputs and the torch
reference outputs for re-checking on the device, and writes ``manifest.json``
and a README.  The folder is assembled under a temporary name and renamed
into place, and a bundle whose inputs have not changed is not rebuilt.

Each backend of a multi-backend target builds on its own: a backend that
fails is recorded in the manifest's ``failures`` and the others are kept
(the CLI exits with :data:`sfedge.errors.EXIT_PARTIAL`); ``require`` names
backends whose failure fails the whole build.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sfedge import __version__, errors
from sfedge.artifact import Artifact
from sfedge.backends.int8 import Int8Options
from sfedge.backends.maker import maker
from sfedge.backends.registry import BACKENDS
from sfedge.bundle import MANIFEST, SCHEMA, SIGNATURE, Bundle, check_files, hash_files, load_bundle
from sfedge.calibration import CalibrationSet, holdout_image, load_calibration
from sfedge.checkpoint import Checkpoint, save_checkpoint
from sfedge.errors import CalibrationError, CheckpointError, ConfigError, OutputFolderError, SfedgeError
from sfedge.fileio import atomic_dir, atomic_path, locked, sfedge_code_sha256, sha256_bytes, write_json, write_text
from sfedge.models import create_model, input_shape, list_models, model_entry
from sfedge.models.specs import weights_sha256
from sfedge.models.tiled import torch_predictor
from sfedge.nn import count_macs, count_params, factorize, fold
from sfedge.parity import Parity, tolerance_for
from sfedge.preprocess import Preprocessing, int8_pixel_map_text
from sfedge.progress import Progress, scaled
from sfedge.signing import sign_bytes
from sfedge.source import ModelSource, resolve_model
from sfedge.targets import Target, load_target
from sfedge.verify_on import VerifyOn
from sfedge.whole_image import WHOLE_IMAGE_TILING, readme_section, store_whole_image

__all__ = ["BuildResult", "build_bundle", "checkpoint_of", "factorize_checkpoint", "toolchain_versions", "bundle_name"]

# What the output map means, per task (the bundle README says it to whoever writes the app).
TASK_MEANING = {
    "binary": "one channel of logits; the mask is logit > 0 (probability 0.5).",
    "multiclass": "one channel per class; the label map is the argmax over channels.",
    "multilabel": "one channel per label, independent; each label's mask is logit > 0 (sigmoid 0.5).",
    "regression": "a continuous map, used as it is.",
}
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

    @property
    def failures(self) -> list[dict[str, str]]:
        """Backends that failed while others built ({backend, error}); empty for a complete bundle."""
        return list(self.bundle.manifest.get("failures") or [])

    @property
    def partial(self) -> bool:
        return bool(self.failures)

    def summary(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {
            "bundle": str(self.path), "cached": self.cached, "model": m["model"]["name"], "target": m["target"]["name"],
            "precision": m["precision"], "task": m["model"].get("task"), "seconds": round(self.seconds, 1),
            "failures": self.failures,
            "artifacts": [
                {"backend": a["backend"], "kind": a["kind"], "size": a.get("size"), "parity": a.get("parity", {}),
                 "shifted_parity": a.get("shifted_parity", {}), "float_layers": len(a.get("float_layers", [])),
                 "parity_on": a.get("parity_on", {})}
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


def checkpoint_of(model: nn.Module) -> Checkpoint:
    """A model given as an ``nn.Module`` (the Python API), described as a checkpoint would describe it."""
    name = getattr(model, "sfedge_name", None) or type(model).__name__
    source = getattr(model, "sfedge_source", None) or {"kind": "python", "class": f"{type(model).__module__}."
                                                        f"{type(model).__qualname__}"}
    return Checkpoint(model=model.eval(), name=name, config=dict(getattr(model, "sfedge_config", {}) or {}),
                      weights_sha256=weights_sha256(model.state_dict()), source=source,
                      metrics={"from_python_object": True})


def bundle_name(ckpt: Checkpoint, target: Target, precision: str) -> str:
    """``<model label>__<target>__<precision>``; the label is the checkpoint's stem or the model's name."""
    label = Path(ckpt.path).stem if ckpt.path is not None else ckpt.name
    return f"{label}__{target.name}__{precision}"


def _family(name: str) -> str:
    return name.removesuffix("-sfconv")


def _build_key(source: ModelSource, target: Target, precision: str, calib: CalibrationSet, tools: dict[str, str],
               options: dict[str, Any]) -> str:
    t = target.as_dict()
    t.pop("path", None)
    payload = {"model": source.metadata(), "target": t, "precision": precision, "calibration": calib.sha256,
               "tools": tools, "options": options, "whole_image": WHOLE_IMAGE_TILING.as_dict(),
               "code": sfedge_code_sha256()}
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())


def build_bundle(
    model: str | os.PathLike[str] | nn.Module | Checkpoint,
    target: str | Target,
    precision: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    task: str | None = None,
    tolerances: Mapping[str, float] | None = None,
    require: Sequence[str] = (),
    calibration: str | os.PathLike[str] = "fundus-demo",
    out_dir: str | os.PathLike[str] = "bundles",
    force: bool = False,
    int8: Int8Options | None = None,
    progress: Progress | None = None,
    verify_on: VerifyOn | None = None,
    sign: str | os.PathLike[str] | None = None,
) -> BuildResult:
    """Build (or reuse) the bundle for (model, target, precision) under ``out_dir``.

    ``model`` is a checkpoint, a registry name, ``file.py:factory`` /
    ``package.module:factory`` (with ``config`` and ``weights``), a ``.pt2``
    program, an ``nn.Module`` or a loaded :class:`Checkpoint`.  ``task`` says
    what the output means (default: the checkpoint's, else detected from the
    output channels); ``tolerances`` overrides keys of the target's tolerance
    for ``precision`` (recorded in the manifest); ``require`` lists backends
    whose failure fails the build (others are recorded and skipped).  ``int8``
    (:class:`sfedge.backends.int8.Int8Options`: QAT steps, calibration
    methods, float I/O, measured layer costs) says how int8 quantizes.  Errors
    (unknown target or precision, corrupt checkpoint, bad calibration set,
    every backend failing) leave no bundle folder behind.  ``verify_on``
    (:class:`sfedge.verify_on.VerifyOn`) also verifies the bundle on remote
    devices before it exists and records their parity in the manifest.
    ``sign``: an SSH key that signs the manifest (``manifest.json.sig``,
    :mod:`sfedge.signing`).  Concurrent builds of one bundle wait for each
    other; the cache is used only when the existing bundle verifies in full
    (files and manifest); only a bundle folder is ever replaced.
    """
    start = time.perf_counter()
    say = progress or (lambda message, fraction=None: None)
    tgt = target if isinstance(target, Target) else load_target(target)
    prec = tgt.check_precision(precision or tgt.default_precision)
    unknown = sorted(set(require) - set(tgt.backends))
    if unknown:
        raise ConfigError(f"--require {', '.join(unknown)}: target {tgt.name} does not build that backend",
                          f"its backends: {', '.join(tgt.backends)}")
    if tolerances:
        tgt = replace(tgt, tolerances={**tgt.tolerances, prec: tolerance_for(tgt.tolerances, prec, tolerances)})
    say("loading model", 0.02)
    if isinstance(model, Checkpoint):
        ckpt = model
    elif isinstance(model, nn.Module):
        ckpt = checkpoint_of(model)
    else:
        ckpt = resolve_model(model, config=config, weights=weights, task=task)
    if task is not None:
        ckpt.task = task
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
    opts: dict[str, Any] = {"tolerances": dict(tolerances or {})}
    if int8 is not None and int8 != Int8Options():
        opts["int8"] = int8.as_dict()
    key = _build_key(source, tgt, prec, calib, tools, opts)
    dest = Path(out_dir) / bundle_name(ckpt, tgt, prec)
    with locked(dest):  # a second build of the same bundle waits here, then finds it up to date
        cached = None if force else _up_to_date(dest, key, sign, verify_on)
        if cached is not None:
            say("up to date", 1.0)
            return BuildResult(dest, True, cached, time.perf_counter() - start)
        if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()
                                      or (not (dest / MANIFEST).is_file() and any(dest.iterdir()))):
            # Only a bundle (a folder with a manifest) is ever replaced: never a folder of the user's own files.
            raise OutputFolderError(f"{dest} exists and is not a bundle", "move it away or choose another -o")
        return _build(ckpt, source, tgt, prec, calib, tools, key, backends, dest, require, tolerances, verify_on,
                      sign, int8, say, start)


def _up_to_date(dest: Path, key: str, sign: str | os.PathLike[str] | None,
                verify_on: VerifyOn | None = None) -> Bundle | None:
    """The existing bundle at ``dest`` if it was built from ``key`` and still verifies in full (files and manifest)."""
    if not (dest / MANIFEST).is_file():
        return None
    try:
        existing = load_bundle(dest)
    except SfedgeError:  # an unreadable or malformed old bundle is simply rebuilt
        return None
    if existing.manifest.get("build_key") != key or not check_files(existing).passed:
        return None
    if verify_on is not None and not verify_on.recorded(existing.manifest):
        return None
    if sign is not None and not (dest / SIGNATURE).is_file():
        return None  # asked for a signed bundle: sign it (rebuild) rather than hand back an unsigned one
    return existing


def _build(ckpt: Checkpoint, source: ModelSource, tgt: Target, prec: str, calib: CalibrationSet, tools: dict[str, str],
           key: str, backends: list[str], dest: Path, require: Sequence[str], tolerances: Mapping[str, float] | None,
           verify_on: VerifyOn | None, sign: str | os.PathLike[str] | None, int8: Int8Options | None,
           say: Progress, start: float) -> BuildResult:
    hold_in = calib.holdout
    hold_ref = source.reference(hold_in)
    with atomic_dir(dest) as tmp:
        artifacts: list[Artifact] = []
        failures: list[dict[str, str]] = []
        for i, b in enumerate(backends):
            say(f"{b} {prec}", 0.1 + 0.8 * i / len(backends))
            sub = scaled(say, 0.1 + 0.8 * i / len(backends), 0.8 / len(backends), b)
            try:
                artifacts.append(maker(b)(source, tgt, prec, calib, tmp, progress=sub, int8=int8))
            except SfedgeError as e:
                if b in require or len(backends) == 1:
                    raise
                failures.append({"backend": b, "error": str(e), "type": type(e).__name__})
                say(f"{b} failed: {e}", None)
        if not artifacts:
            raise type_of_first(failures)(f"no backend of {tgt.name} built {ckpt.name} at {prec}: "
                                          + "; ".join(f"{f['backend']}: {f['error']}" for f in failures))
        say("writing manifest", 0.95)
        np.save(tmp / "holdout_inputs.npy", hold_in)
        np.save(tmp / "holdout_reference.npy", hold_ref)
        image, where = holdout_image(calib)  # the whole-image reference: the torch model, tiled
        try:
            whole = store_whole_image(tmp, image, calib.spec.preprocessing, source.input_shape[2:],
                                      torch_predictor(source.model), where)
        except ConfigError as e:  # a model that cannot be tiled still gets its bundle, without whole-image checks
            whole = None
            say(f"no whole-image reference: {e}", None)
        if calib.has_shifted:
            assert calib.shifted is not None
            np.save(tmp / "shifted_inputs.npy", calib.shifted)
            np.save(tmp / "shifted_reference.npy", source.reference(calib.shifted))
        manifest = _manifest(ckpt, source, tgt, prec, calib, tools, key, artifacts, tmp, count_params(source.model),
                             count_macs(source.model, source.input_shape))
        manifest["failures"] = failures
        if calib.has_shifted:
            manifest["reference"]["shifted"] = {
                "inputs": "shifted_inputs.npy", "outputs": "shifted_reference.npy",
                "what": "augmented held-out samples (other scale, exposure, contrast, blur, noise; never calibrated "
                        "on) and the fp32 torch model's outputs on them"}
        if int8 is not None:
            manifest["int8_options"] = int8.as_dict()
        manifest["tolerance_overrides"] = dict(tolerances or {})
        manifest["whole_image"] = whole
        write_text(tmp / "README.md", _readme(manifest) + readme_section(manifest))
        manifest["files"] = hash_files(tmp)
        for a in manifest["artifacts"]:
            info = manifest["files"].get(a["path"])
            a["sha256"], a["size"] = (info["sha256"], info["size"]) if info else (None, _dir_size(tmp / a["path"]))
        write_json(tmp / MANIFEST, manifest)
        if verify_on is not None:  # parity on the devices' own kernels; a failure there leaves no bundle
            verify_on.check(tmp, dest.name, say)
        if sign is not None:  # last: the signature covers the manifest as it ends up
            say("signing the manifest", 0.98)
            signature = sign_bytes((tmp / MANIFEST).read_bytes(), sign)
            with atomic_path(tmp / SIGNATURE) as sig:
                sig.write_bytes(signature)
    say("done", 1.0)
    return BuildResult(dest, False, load_bundle(dest), time.perf_counter() - start)


def type_of_first(failures: list[dict[str, str]]) -> type[SfedgeError]:
    """The error class of the first failure (so an all-parity failure stays a ParityError)."""
    cls = getattr(errors, failures[0]["type"], SfedgeError) if failures else SfedgeError
    return cls if isinstance(cls, type) and issubclass(cls, SfedgeError) else SfedgeError


def _conv(ckpt: Checkpoint) -> str:
    """sfconv when the model has SFConv layers (its config says so, or a recorded factorization), else dense."""
    return "sfconv" if ckpt.config.get("conv") == "sfconv" or ckpt.factorized else "dense"


def _s(ckpt: Checkpoint) -> float | None:
    if _conv(ckpt) != "sfconv":
        return None
    return ckpt.config.get("s") if ckpt.config.get("conv") == "sfconv" else ckpt.metrics.get("s")


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
            "name": ckpt.name, "family": _family(ckpt.name), "conv": _conv(ckpt), "s": _s(ckpt),
            "config": ckpt.config, "weights_sha256": ckpt.weights_sha256, "params": params, "macs": macs,
            "input_shape": list(source.input_shape), "preprocessing": source.preprocessing, "task": source.task,
            "checkpoint": str(ckpt.path) if ckpt.path else None,
            "source": ckpt.source or {"kind": "registry", "spec": ckpt.name},
            "factorized_layers": len(ckpt.factorized), "metrics": ckpt.metrics, "notes": source.notes,
            "plan": ckpt.metrics.get("plan"),  # sfedge plan: per layer choice, rank, predicted ms, MACs (or None)
        },
        "target": t,
        "precision": precision,
        "calibration": {"name": calib.name, "sha256": calib.sha256, "samples": len(calib.calibration),
                        "holdout": len(calib.holdout), "source": calib.files[:3],
                        "shifted": 0 if calib.shifted is None else len(calib.shifted),
                        "augment": calib.spec.augment.as_dict(), "preprocessing": calib.spec.preprocessing.as_dict()},
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
        "| backend | file | precision | parity vs torch (held-out) | shifted held-out | layers kept float |",
        "|---|---|---|---|---|---|",
    ]
    for a in m["artifacts"]:
        par = Parity.from_dict(a.get("parity"))
        shifted = Parity.from_dict(a.get("shifted_parity"))
        lines.append(f"| {a['backend']} | `{a['path']}` | {a['precision']} | {par.summary() if par else '-'} | "
                     f"{shifted.summary() if shifted else '-'} | {len(a.get('float_layers', []))} |")
    for f in m.get("failures") or []:
        lines.append(f"| {f['backend']} | not built | {m['precision']} | {f['error']} | - | - |")
    inp = m["artifacts"][0]["inputs"][0] if m["artifacts"] and m["artifacts"][0]["inputs"] else None
    pre = model.get("preprocessing") or {}
    lines += ["", "## Input", ""]
    if inp:
        lines.append(f"`{inp['name']}`: shape {inp['shape']}, {inp['dtype']}, layout {inp['layout']}"
                     + (f", quantized: real = {inp['scale']:.6g} * (q - {inp['zero_point']})" if inp.get("scale") else ""))
    if pre:
        lines.append(f"Preprocessing: image / 255, then (x - mean) / std with mean {pre.get('mean')} and std {pre.get('std')} "
                     f"({pre.get('channels')} channels).")
    lines += _int8_io_lines(m["artifacts"], pre or m["calibration"].get("preprocessing") or {})
    lines += ["", f"Output: {TASK_MEANING.get(model.get('task') or 'binary', '')}"]
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


def _int8_io_lines(artifacts: list[dict], pre: dict) -> list[str]:
    """README lines for each artifact with int8 I/O: the uint8-pixel -> int8 input map and the output's scale."""
    out: list[str] = []
    for a in artifacts:
        ins, outs = a.get("inputs") or [], a.get("outputs") or []
        if not ins or not ins[0].get("scale"):
            continue
        i = ins[0]
        out += ["", f"`{a['path']}` takes int8: real = {i['scale']:.6g} * (q - {i['zero_point']}). From camera bytes:"]
        if pre:
            text = int8_pixel_map_text(Preprocessing.from_dict(pre), float(i["scale"]), int(i["zero_point"]))
            out.append(f"{text} (`sfedge.preprocess.pixels_to_int8`).")
        o = outs[0] if outs else {}
        if o.get("scale"):
            out.append(f"Its output is int8 too: real = {o['scale']:.6g} * (q - {o['zero_point']}); a logit > 0 is "
                       f"q > {o['zero_point']}.")
    return out


def factorize_checkpoint(
    model: str | os.PathLike[str],
    s: float,
    out_path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    task: str | None = None,
    skip: Sequence[str] = (),
    input_size: Sequence[int] = (256, 256),
) -> tuple[Path, Any]:
    """A model's kxk convs -> SFConv2d at ratio ``s`` by truncated SVD, saved as a checkpoint that rebuilds alone.

    ``model`` is anything :func:`sfedge.source.resolve_model` takes (with
    ``config`` / ``weights`` for a spec).  sfedge's own families become
    ``<family>-sfconv`` with ``s`` in their config; any other model keeps its
    source and the checkpoint records the rank of every factorized layer, so
    ``load_checkpoint`` rebuilds it exactly.  ``skip`` takes glob patterns of
    layer names to keep dense.  Returns the new path and the per-layer
    FactorizeReport (transposed, 1x1 and grouped convs listed as kept dense).
    """
    ck = resolve_model(model, config=config, weights=weights, task=task)
    if ck.input_shape is not None:
        raise ConfigError(f"{model} is a torch.export program, which sfedge cannot factorize (its graph is fixed)",
                          "factorize the model's code instead: FILE.py:factory --weights WEIGHTS, then export that")
    base = ck.model
    shape = input_shape(ck.config, input_size, base)
    if ck.config.get("conv") == "sfconv" or ck.factorized:  # re-rank an SFConv model: fold to dense first
        fold(base)
    report = factorize(base, s=s, skip=skip, input_shape=shape)
    metrics = {"factorized_from": str(model), "from_weights_sha256": ck.weights_sha256, "s": s,
               "mac_reduction": report.mac_reduction, "skip": list(skip)}
    own_family = ck.source is None and ck.name in list_models() and "conv" in model_entry(ck.name).defaults
    if own_family:
        sf_name = f"{_family(ck.name)}-sfconv"
        name = sf_name if sf_name in list_models() else ck.name
        rebuilt = create_model(name, **{**ck.config, "conv": "sfconv", "s": s})
        if skip:
            raise ConfigError(f"--skip does not apply to sfedge's own '{ck.name}' (its conv factory factorizes every "
                              "eligible layer)", "drop --skip, or factorize a model of your own")
        try:
            rebuilt.load_state_dict(base.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"factorized '{ck.name}' does not match the registry's '{name}' layout: {e}") from e
        save_checkpoint(rebuilt, out_path, preprocessing=ck.preprocessing, metrics=metrics, task=ck.task)
    else:
        save_checkpoint(base, out_path, preprocessing=ck.preprocessing, metrics=metrics, task=ck.task,
                        record_factorization=True)
    return Path(out_path), report
