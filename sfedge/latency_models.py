"""The small models a latency table is measured with: each conv layer alone, dense and SFConv at a grid of ranks.

Build side (torch and the converters); the measuring is device side
(:mod:`sfedge.profile.latency_table`).  :func:`make_kit` writes a *kit*
folder: for every distinct conv layer shape of a model (channels, kernel,
stride, padding, dilation, input size) the layer alone as a model of its own
(conv + ReLU, the pattern the whole model fuses it into) at its real input
shape, dense and as SFConv at each rank of the grid, in the target's runtime
format and precision; and whole models: the dense model itself and uniformly
factorized copies (truncated SVD of its weights) that the table is checked
against.  Files are cached per backend, precision, layout and converter
version and shape (weights of a lone layer do not change its latency, so they
are seeded random), so a second model sharing shapes converts nothing again.

Per-layer int8 TFLite models are calibrated on random inputs (their ranges do
not change int8 kernel speed); whole int8 models on the calibration set when
one is given.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfedge.backends.onnxruntime.make import ort_scorer
from sfedge.backends.tflite.convert import cast_weights_fp16, convert_float, tflite_layout
from sfedge.backends.tflite.quantize import build_recipe, calibrate, write_quantized
from sfedge.calibration import CalibrationSet
from sfedge.checkpoint import Checkpoint
from sfedge.errors import ConfigError
from sfedge.export import export_onnx
from sfedge.fileio import atomic_path
from sfedge.models.specs import weights_sha256
from sfedge.nn import SFConv2d, factorize, rank_for
from sfedge.nn.factorize import eligible
from sfedge.parity import Tolerance
from sfedge.profile.latency_table import ConvShape, cache_root, write_kit_index
from sfedge.progress import Progress
from sfedge.source import ModelSource
from sfedge.targets import Target

__all__ = [
    "GRID_S", "VALIDATION_S", "KIT_PRECISIONS", "conv_layers", "rank_grid", "model_key", "make_kit", "layer_module",
]

# The grid of rank ratios a table measures per layer: the sweep's uniform s (1, 0.5, 0.25, 0.125) so uniform models
# are predicted from measured entries, plus ranks between them so vector-width steps (12 vs 16) show.
GRID_S = (1.0, 0.5, 0.375, 0.25, 0.125, 0.0625)
VALIDATION_S = (1.0, 0.5, 0.25, 0.125)
# What a kit can be made for: (backend, precision).  ONNX Runtime's Q/DQ int8 runs by dequantizing (it exists for
# TensorRT), TensorRT's per-layer engines would have to be built on the device.
KIT_PRECISIONS = {"onnxruntime": ("fp32",), "tflite": ("fp32", "fp16", "int8")}
# Whole models in a kit are checked only for a gross conversion error (their latency is what counts).
_WHOLE_TOLERANCE = Tolerance(max_abs=1e-2)


class _LayerModel(nn.Sequential):
    """A conv layer alone: the conv (dense or SFConv) and the ReLU every runtime fuses into it."""


def layer_module(shape: ConvShape, rank: int | None, seed: int = 0) -> nn.Module:
    """The lone-layer model for ``shape``: dense (``rank`` None) or SFConv at ``rank``, seeded random weights."""
    torch.manual_seed(seed)
    common = {"stride": shape.stride, "padding": shape.padding, "dilation": shape.dilation, "bias": shape.bias}
    if rank is None:
        conv: nn.Module = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, **common)
    else:
        conv = SFConv2d(shape.in_channels, shape.out_channels, shape.kernel, rank=rank, **common)
    model = _LayerModel(conv, nn.ReLU()).eval()
    for p in model.parameters():
        p.data = p.data.contiguous()
    return model


def conv_layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, ConvShape]]:
    """(name, shape) of every conv ``sfedge.nn.factorize`` would factorize, in call order, at ``input_shape``."""
    seen: dict[str, ConvShape] = {}
    hooks = []
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, SFConv2d))
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and eligible(m) is None and not name.startswith(inside or ("\0",)):
            def hook(mod: nn.Conv2d, args: tuple, name: str = name) -> None:
                if name not in seen:
                    pad = mod.padding if not isinstance(mod.padding, str) else _same_padding(mod)
                    seen[name] = ConvShape(mod.in_channels, mod.out_channels, tuple(mod.kernel_size),  # type: ignore[arg-type]
                                           tuple(mod.stride), tuple(pad), tuple(mod.dilation),  # type: ignore[arg-type]
                                           tuple(args[0].shape[-2:]), True)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(tuple(input_shape)))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return list(seen.items())


def _same_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))  # type: ignore[return-value]


def rank_grid(shape: ConvShape, s_values: Sequence[float] = GRID_S) -> list[int]:
    """The ranks a table measures for ``shape``: ``rank_for(s)`` of each s, within the factorization's range."""
    ranks = {rank_for(s, shape.in_channels, shape.out_channels) for s in s_values}
    return sorted(r for r in ranks if 1 <= r <= shape.max_rank)


def model_key(ckpt: Checkpoint, input_shape: Sequence[int]) -> str:
    """What a table is for: the *dense* architecture and input shape, not weights nor factorization.

    An SFConv model and its dense twin share the key (family without
    ``-sfconv``, config without ``conv`` and ``s``, as bundles pair them), so
    a table measured for the dense model prices any factorization of it.
    """
    config = {k: v for k, v in ckpt.config.items() if k not in ("conv", "s")}
    payload = {"family": ckpt.name.removesuffix("-sfconv"), "config": config, "source": ckpt.source,
               "input_shape": list(input_shape)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _converter(backend: str) -> str:
    names = {"onnxruntime": ("torch", "onnxruntime"), "tflite": ("litert-torch", "ai-edge-quantizer")}[backend]
    out = []
    for n in names:
        try:
            out.append(f"{n}{version(n)}")
        except PackageNotFoundError:
            out.append(n)
    return "-".join(out)


def _model_dir(backend: str, precision: str, layout: str) -> Path:
    return cache_root() / "latency" / "models" / f"{backend}-{precision}-{layout.lower()}-{_converter(backend)}"


def _convert_layer(model: nn.Module, shape: ConvShape, backend: str, precision: str, layout: str, path: Path) -> Path:
    """Write the lone-layer model in the runtime's format (cached: an existing file is kept)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    input_shape = (1, shape.in_channels, *shape.input_hw)
    if backend == "onnxruntime":
        with atomic_path(path) as tmp:
            torch.onnx.export(model, (torch.zeros(input_shape),), str(tmp), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"], do_constant_folding=True)
        return path
    fp32 = path if precision == "fp32" else path.with_name(path.stem.rsplit("-", 1)[0] + "-fp32.tflite")
    if not fp32.is_file():
        convert_float(model, input_shape, layout, fp32)
    if precision == "fp16":
        cast_weights_fp16(fp32, path)
    elif precision == "int8":
        rng = np.random.default_rng(0)
        hw_first = (1, *shape.input_hw, shape.in_channels) if layout == "NHWC" else input_shape
        samples = [{"args_0": rng.standard_normal(hw_first).astype(np.float32)} for _ in range(4)]
        recipe = build_recipe("int8")
        write_quantized(fp32, path, recipe, calibrate(fp32, samples, "serving_default", recipe))
    return path


def _whole_file(model: nn.Module, name: str, ckpt: Checkpoint, input_shape: tuple[int, int, int, int], backend: str,
                precision: str, layout: str, folder: Path, calibration: CalibrationSet | None, threads: int | None) -> Path:
    """A whole model in the runtime's format (cached by weights, shape and precision)."""
    for p in list(model.parameters()) + list(model.buffers()):
        p.data = p.data.contiguous()
    digest = weights_sha256(model.state_dict())
    stem = f"whole-{ckpt.name}-{digest[:12]}-{'x'.join(map(str, input_shape[2:]))}"
    ext = ".onnx" if backend == "onnxruntime" else ".tflite"
    path = folder / f"{stem}-{precision}{ext}"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    source = ModelSource(model.eval(), f"{ckpt.name}-{name}", dict(ckpt.config), digest, input_shape)
    if backend == "onnxruntime":
        export_onnx(source, path, score=ort_scorer(threads), tolerance=_WHOLE_TOLERANCE)
        return path
    fp32 = folder / f"{stem}-fp32.tflite"
    if not fp32.is_file():
        convert_float(model, input_shape, layout, fp32)
    if precision == "fp16":
        cast_weights_fp16(fp32, path)
    elif precision == "int8":
        if calibration is not None and tuple(calibration.calibration.shape[1:]) == tuple(input_shape[1:]):
            samples = [{"args_0": s} for s in calibration.batches("calibration", layout)][:16]
        else:
            rng = np.random.default_rng(0)
            shape = (1, *input_shape[2:], input_shape[1]) if layout == "NHWC" else input_shape
            samples = [{"args_0": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
        recipe = build_recipe("int8")
        write_quantized(fp32, path, recipe, calibrate(fp32, samples, "serving_default", recipe))
    return path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_kit(
    ckpt: Checkpoint,
    target: Target,
    backend: str,
    precision: str,
    out: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int, int],
    s_values: Sequence[float] = GRID_S,
    validation: Sequence[float] = VALIDATION_S,
    extra_whole: Mapping[str, Mapping[str, int]] | None = None,
    layer_ranks: Mapping[str, Sequence[int]] | None = None,
    calibration: CalibrationSet | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the latency kit of the dense model ``ckpt`` for (target, backend, precision) into ``out``.

    ``s_values``: the rank grid (:func:`rank_grid`) unless ``layer_ranks``
    names each layer's ranks; ``validation``: uniform s of the whole models
    the table is checked against; ``extra_whole``: more whole models to
    measure ({name: {layer: rank}}).
    """
    say = progress or (lambda message, fraction=None: None)
    if precision not in KIT_PRECISIONS.get(backend, ()):
        raise ConfigError(f"latency tables are made for {', '.join(f'{b} {p}' for b, ps in KIT_PRECISIONS.items() for p in ps)}"
                          f", not {backend} {precision}",
                          "ONNX Runtime's int8 files dequantize (they exist for TensorRT); TensorRT layers would have to "
                          "be built on the device")
    if ckpt.factorized or ckpt.config.get("conv") == "sfconv":
        raise ConfigError(f"{ckpt.name} already has SFConv layers; a latency table is made from the dense model",
                          "give the vanilla (dense) checkpoint")
    layout = tflite_layout(target) if backend == "tflite" else "NCHW"
    base = ckpt.model.eval()
    layers = conv_layers(base, input_shape)
    if not layers:
        raise ConfigError(f"{ckpt.name} has no conv layer SFConv can factorize", "check the model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = _model_dir(backend, precision, layout)
    ext = ".onnx" if backend == "onnxruntime" else ".tflite"
    kit: dict[str, Any] = {"model": ckpt.name, "model_key": model_key(ckpt, input_shape), "backend": backend,
                           "precision": precision, "threads": target.threads, "target": target.name, "layout": layout,
                           "input_shape": list(input_shape), "layers": [], "shapes": {}, "whole": []}
    unique: dict[str, tuple[ConvShape, set[int]]] = {}
    for name, shape in layers:
        ranks = list(layer_ranks[name]) if layer_ranks is not None and name in layer_ranks else rank_grid(shape, s_values)
        kit["layers"].append({"name": name, "shape": shape.as_dict(), "ranks": ranks})
        unique.setdefault(shape.key(), (shape, set()))[1].update(ranks)
    total = sum(1 + len(r) for _, r in unique.values()) + 1 + len(validation) + len(extra_whole or {})
    done = 0
    for key, (shape, ranks) in unique.items():
        entry: dict[str, Any] = {"dense": f"layers/{key}-dense{ext}", "ranks": {}}
        say(f"layer models for {key}", done / total)
        _link(_convert_layer(layer_module(shape, None), shape, backend, precision, layout,
                             cache / f"{key}-dense-{precision}{ext}"), out / entry["dense"])
        done += 1
        for r in sorted(ranks):
            rel = f"layers/{key}-r{r}{ext}"
            _link(_convert_layer(layer_module(shape, r), shape, backend, precision, layout,
                                 cache / f"{key}-r{r}-{precision}{ext}"), out / rel)
            entry["ranks"][str(r)] = rel
            done += 1
            say(f"layer models for {key}", done / total)
        kit["shapes"][key] = entry
    wholes: dict[str, dict[str, int]] = {"dense": {}}
    for s in validation:
        wholes[f"s={s:g}"] = {n: rank_for(s, sh.in_channels, sh.out_channels) for n, sh in layers}
    wholes.update({k: dict(v) for k, v in (extra_whole or {}).items()})
    for name, ranks in wholes.items():
        say(f"whole model {name}", done / total)
        model = copy.deepcopy(base)
        if ranks:
            factorize(model, ranks=ranks)
        path = _whole_file(model, name, ckpt, input_shape, backend, precision, layout, cache / "whole", calibration,
                           target.threads)
        rel = f"whole/{name.replace('=', '')}{ext}"
        _link(path, out / rel)
        kit["whole"].append({"name": name, "file": rel, "ranks": ranks})
        done += 1
    write_kit_index(out, kit)
    say("kit ready", 1.0)
    return out
