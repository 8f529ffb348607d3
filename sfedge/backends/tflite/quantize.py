"""fp32 .tflite -> INT8 with ai-edge-quantizer: full-integer (int8 in/out) or dynamic-range, with mixed precision.

Why ai-edge-quantizer on the converted file rather than litert-torch's PT2E
flow: PT2E failed on U-Nets with skip concatenation, factorized and
transposed convs (TOOLCHAIN.md); the quantizer works on any .tflite.

* ``int8``: ``static_wi8_ai8`` (int8 weights per channel, int8 activations
  per tensor) calibrated on the shared :class:`CalibrationSet`
  (``calib.tflite_samples``, one dict per sample, per signature); the input
  and output tensors become int8, so a device feeds quantized pixels.
* ``int8-dynamic``: ``dynamic_wi8_afp32`` (int8 weights, activations
  quantized on the fly; float I/O, no calibration).
* Ops that must stay float are given as scope regexes (``keep_float``); the
  quantizer puts DEQUANTIZE / QUANTIZE around them.  The Factorizer's NMF
  layers always stay float (:data:`NMF_SCOPE`): its iterations divide by
  ``eps``-guarded sums that int8 (or fp16) cannot represent.
* :func:`quantize_tflite` adds float layers one at a time until the held-out
  parity meets the tolerance: layers are ranked by a sensitivity pass
  (:func:`layer_sensitivity`: each quantizable layer quantized *alone*, its
  error measured on a few *calibration* samples, so the held-out split only
  gates).  If that is not enough, int16 activations (``static_wi8_ai16``)
  are tried, which recover accuracy but which XNNPACK does not run (slow
  TFLite kernels).

Measured on the demo U-Nets: most of the int8 error is the per-tensor int8
quantization of the *normalized input image* (its channels span different
ranges, so the red channel loses about a bit); keeping the first conv and
the model input float removes it at almost no latency cost, and the ranking
finds that layer first.

A "layer" is one TFLite op with weights (conv, transposed conv, fully
connected, matmul); its name is the torch module path recovered from the
tensor names litert-torch writes (``inc.3.conv_b``), its regex matches
exactly that op's output tensor.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfedge.backends.tflite.ops import read_ops
from sfedge.errors import CalibrationError, ConfigError
from sfedge.fileio import atomic_path

__all__ = [
    "NMF_SCOPE", "QUANTIZABLE_OPS", "Layer", "LayerSensitivity", "QuantizeResult", "quantizable_layers",
    "torch_layer_name", "module_call_order", "LayerNamer", "scope_layers", "build_recipe", "calibrate", "write_quantized", "layer_sensitivity", "quantize_tflite",
]

Progress = Callable[[str, "float | None"], None]
Score = Callable[[Path, str], Any]  # (tflite path, split) -> Parity; split: "holdout", "calibration" or "probe"

# Scope of every op inside an sfedge NMF layer (litert-torch names tensors by module class path).
NMF_SCOPE = r"sfedge\.nn\.nmf\.NMF_"
QUANTIZABLE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL")
_WRAPPER = "ChannelLastIOWrapper"
_LEAF_CLASSES = ("Conv2d", "ConvTranspose2d", "Linear")


@dataclass(frozen=True)
class Layer:
    """One quantizable op: its torch-style name, TFLite op type and the recipe regexes that select it.

    ``regexes`` match the op's output tensor and, when the op reads the
    model input, the input tensor too: keeping such a layer float only helps
    if the input stays float as well (quantizing a normalized image per
    tensor is most of the int8 error of an image model's first conv).
    """

    name: str
    op: str
    regexes: tuple[str, ...]


@dataclass
class LayerSensitivity:
    """Parity of the quantized model with one layer kept float (higher agreement: more sensitive layer)."""

    layer: str
    op: str
    dice_agreement: float
    mean_abs: float
    max_abs: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizeResult:
    """What :func:`quantize_tflite` produced and how it got there."""

    path: Path
    precision: str
    recipe: list[dict[str, Any]]
    activation_bits: int | None  # None for dynamic range (float activations)
    float_layers: list[str] = field(default_factory=list)  # torch-style names of ops kept float
    parity: Any = None  # held-out Parity of the final file
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)  # each tried configuration and its parity
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "precision": self.precision, "recipe": self.recipe,
            "activation_bits": self.activation_bits, "float_layers": list(self.float_layers),
            "parity": self.parity.as_dict() if self.parity is not None else None,
            "sensitivity": [s.as_dict() for s in self.sensitivity], "attempts": list(self.attempts),
            "notes": list(self.notes),
        }


def _module_path(component: str, stop_class: str | None = None) -> tuple[str, str]:
    """'.../pkg.DoubleConv_inc/pkg.SFConv2d_3/torch...Conv2d_conv_b' -> ('inc.3.conv_b', 'Conv2d')."""
    segments = [s for s in component.split("/") if s and _WRAPPER not in s]
    attrs, leaf = [], ""
    for seg in segments[1:]:  # the first is the root model
        cls_attr = seg.rsplit(".", 1)[-1]
        cls, _, attr = cls_attr.partition("_")
        attrs.append(attr or cls)
        leaf = cls
        if stop_class and stop_class in seg:
            break
    return ".".join(attrs), leaf


def torch_layer_name(tensor_name: str, stop_class: str | None = None) -> str:
    """The module path (``inc.3.conv_b``) in an op's output tensor name (fused ops: the conv / linear among them).

    litert-torch names tensors by the stack of *called* modules, so a
    ``ModuleList`` (never called itself) is missing from the path:
    ``encoder.0`` and ``decoder.0`` both read ``0``.  :class:`LayerNamer`
    completes such names from the torch model's call order.
    """
    parts = [p.split(";")[0] for p in tensor_name.split(";;")]
    parsed = [_module_path(p, stop_class) for p in parts if p]
    if not parsed:
        return tensor_name
    name = next((n for n, leaf in parsed if leaf in _LEAF_CLASSES), parsed[-1][0])
    return name or tensor_name


def module_call_order(model: Any, input_shape: Sequence[int]) -> list[str]:
    """Names of ``model``'s submodules in the order one forward pass calls them (repeats included)."""
    import torch

    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return order


class LayerNamer:
    """Full torch module paths for ops, from their tensor names and the model's call order.

    The j-th run of consecutive ops whose tensor names give the same partial
    path belongs to the j-th call of a module whose full path ends with it.
    Without a call order, the partial path is kept.
    """

    def __init__(self, call_order: Sequence[str] | None = None) -> None:
        self.call_order = list(call_order or [])

    def names(self, tensor_names: Sequence[str], stop_class: str | None = None) -> list[str]:
        """One resolved name per op (``tensor_names``: each op's first output, in graph order)."""
        partial = [torch_layer_name(t, stop_class) for t in tensor_names]
        runs: dict[str, int] = {}
        out, prev = [], None
        for p in partial:
            if p != prev:
                runs[p] = runs.get(p, -1) + 1
            prev = p
            calls = [c for c in self.call_order if c == p or c.endswith("." + p)]
            # A module called once per run of ops; a name reached by several modules is told apart by run index.
            out.append(calls[runs[p]] if runs[p] < len(calls) else (calls[0] if len(set(calls)) == 1 else p))
        return out


def quantizable_layers(float_path: str | os.PathLike[str], namer: LayerNamer | None = None,
                       exclude: Sequence[str] = ()) -> list[Layer]:
    """Ops with weights in the main subgraph, in execution order, except those matching ``exclude`` regexes
    and the op that writes the model output (keeping it float would make the output float too).
    """
    graphs, io = read_ops(float_path)
    ops = graphs[0] if graphs else []
    names = {}  # tensor index -> name, for the model's input tensors
    for op in ops:
        for i, t in enumerate(op.output_ids):
            names[t] = op.outputs[i] if i < len(op.outputs) else ""
    chosen = []
    for op in ops:
        if op.op not in QUANTIZABLE_OPS or not op.outputs or set(op.output_ids) & set(io.get("outputs", [])):
            continue
        if not any(re.search(rx, ";".join(op.outputs) + ";") for rx in exclude):
            chosen.append(op)
    names = (namer or LayerNamer()).names([op.outputs[0] for op in chosen])
    out = []
    for op, name in zip(chosen, names):
        regexes = ["^" + re.escape(op.outputs[0]) + ";"]
        for t in set(op.input_ids) & set(io.get("inputs", [])):
            regexes.append("^" + re.escape(io["input_names"][io["inputs"].index(t)]) + ";")
        out.append(Layer(name, op.op, tuple(regexes)))
    return out


def scope_layers(float_path: str | os.PathLike[str], regex: str, namer: LayerNamer | None = None,
                 stop_class: str | None = None) -> list[str]:
    """Torch-style names (deduplicated, in order) of the modules whose ops' scopes match ``regex``."""
    graphs, _ = read_ops(float_path)
    tensors = [op.outputs[0] for op in (graphs[0] if graphs else [])
               if op.outputs and re.search(regex, ";".join(op.outputs) + ";")]
    return list(dict.fromkeys((namer or LayerNamer()).names(tensors, stop_class)))


def build_recipe(precision: str, keep_float: Sequence[str] = (), activation_bits: int = 8) -> list[dict[str, Any]]:
    """The ai-edge-quantizer recipe (JSON list) for ``precision`` with ``keep_float`` scope regexes left float.

    Later entries win in the quantizer, so the float exceptions follow the
    model-wide rule.
    """
    from ai_edge_quantizer import qtyping, recipe_manager

    rm = recipe_manager.RecipeManager()
    everything = qtyping.TFLOperationName.ALL_SUPPORTED
    if precision == "int8":
        if activation_bits not in (8, 16):
            raise ConfigError(f"activation bits must be 8 or 16, got {activation_bits}")
        rm.add_static_config(".*", everything, activation_num_bits=activation_bits, weight_num_bits=8)
    elif precision == "int8-dynamic":
        rm.add_dynamic_config(".*", everything, num_bits=8)
    else:
        raise ConfigError(f"ai-edge-quantizer builds int8 and int8-dynamic here, not '{precision}'",
                          "fp32 and fp16 come from convert.py")
    for rx in keep_float:
        rm.add_quantization_config(rx, everything, algorithm_key="no_quantize")
    return rm.get_quantization_recipe()


@contextlib.contextmanager
def _no_tqdm() -> Any:
    # The quantizer draws tqdm bars on stderr; the CLI shows its own progress.
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def calibrate(float_path: str | os.PathLike[str], samples: list[dict[str, Any]], signature: str,
              recipe: list[dict[str, Any]]) -> dict[str, Any]:
    """Min/max of every tensor over ``samples`` (ai-edge-quantizer QSVs), reusable for any recipe on the same file."""
    from ai_edge_quantizer import quantizer

    if not samples:
        raise CalibrationError("the calibration split is empty", "give a calibration set with at least one sample")
    q = quantizer.Quantizer(str(float_path), recipe)
    with _no_tqdm():
        return q.calibrate({signature: samples}, num_threads=max(1, min(2, os.cpu_count() or 1)))


def write_quantized(float_path: str | os.PathLike[str], path: str | os.PathLike[str], recipe: list[dict[str, Any]],
                    qsvs: dict[str, Any] | None) -> Path:
    """Quantize ``float_path`` with ``recipe`` (and calibration ``qsvs`` for static recipes) into ``path``."""
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(float_path), recipe)
    with _no_tqdm():
        result = q.quantize(qsvs if q.need_calibration else None, enable_progress_report=False)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(result.quantized_model))
    return Path(path)


def _only(regexes: Sequence[str], precision: str) -> list[dict[str, Any]]:
    """A recipe quantizing only the ops (and model input) matched by ``regexes``; the rest stays float."""
    from ai_edge_quantizer import qtyping, recipe_manager

    rm = recipe_manager.RecipeManager()
    for rx in regexes:
        if precision == "int8":
            rm.add_static_config(rx, qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
        else:
            rm.add_dynamic_config(rx, qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=8)
    return rm.get_quantization_recipe()


def layer_sensitivity(float_path: Path, layers: Sequence[Layer], precision: str, qsvs: dict[str, Any] | None,
                      score: Score, workdir: Path, *, progress: Progress | None = None) -> list[LayerSensitivity]:
    """Quantize one layer at a time (the rest float) and measure its error on the calibration split; worst first.

    One layer alone isolates its own quantization error; the opposite probe
    (one layer float in an int8 model) buries a single layer's share under
    the error of all the others and ranks by noise.
    """
    out = []
    probe = workdir / f".{float_path.stem}.probe.tflite"
    try:
        for i, layer in enumerate(layers):
            if progress:
                progress(f"sensitivity: {layer.name} alone in {precision}", i / max(1, len(layers)))
            p = score(write_quantized(float_path, probe, _only(layer.regexes, precision), qsvs), "probe")
            out.append(LayerSensitivity(layer.name, layer.op, p.dice_agreement, p.mean_abs, p.max_abs))
    finally:
        probe.unlink(missing_ok=True)
    out.sort(key=lambda s: (-s.mean_abs, s.dice_agreement))
    return out


def quantize_tflite(
    float_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    precision: str,
    *,
    samples: list[dict[str, Any]] | None,
    signature: str,
    score: Score,
    tolerance: Any,
    keep_float: Sequence[str] = (),
    namer: LayerNamer | None = None,
    max_float_fraction: float = 0.5,
    allow_int16: bool = True,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize ``float_path`` to ``precision``, keeping layers float until ``tolerance`` holds on the held-out split.

    ``score(path, split)`` runs a .tflite on the calibration set's ``split``
    and returns a :class:`sfedge.parity.Parity` against torch.  The result
    holds the last file tried; the caller gates it with ``check_parity`` (the
    search may run out of float budget, ``max_float_fraction`` of the layers).
    """
    float_path, path = Path(float_path), Path(path)
    workdir = path.parent
    activation_bits = 8 if precision == "int8" else None
    base = build_recipe(precision, keep_float, activation_bits or 8)
    qsvs = calibrate(float_path, samples or [], signature, base) if precision == "int8" else None

    def attempt(extra: Sequence[str], bits: int, label: str) -> Any:
        recipe = build_recipe(precision, [*keep_float, *extra], bits)
        write_quantized(float_path, path, recipe, qsvs)
        parity = score(path, "holdout")
        result.attempts.append({"config": label, "activation_bits": bits if precision == "int8" else None,
                                "float_layers": len(extra), "parity": parity.as_dict()})
        result.recipe, result.parity = recipe, parity
        return parity

    result = QuantizeResult(path, precision, base, activation_bits)
    if progress:
        progress(f"ai-edge-quantizer: {precision}", None)
    parity = attempt([], activation_bits or 8, "all layers quantized")
    if not tolerance.failures(parity.as_dict()):
        return result

    layers = quantizable_layers(float_path, namer, exclude=keep_float)
    budget = int(max_float_fraction * len(layers))
    if budget:
        result.sensitivity = layer_sensitivity(float_path, layers, precision, qsvs, score, workdir, progress=progress)
    by_name = {layer.name: layer for layer in layers}
    chosen: list[Layer] = []
    for s in result.sensitivity[:budget]:
        chosen.append(by_name[s.layer])
        if progress:
            progress(f"mixed precision: {len(chosen)} layer(s) float", len(chosen) / budget)
        parity = attempt([rx for c in chosen for rx in c.regexes], activation_bits or 8,
                         f"{len(chosen)} most sensitive layer(s) float")
        if not tolerance.failures(parity.as_dict()):
            result.float_layers = [c.name for c in chosen]
            result.notes.append(f"kept {len(chosen)} of {len(layers)} quantizable layers float to meet the "
                                f"{precision} tolerance: {', '.join(result.float_layers)}")
            if any(len(c.regexes) > 1 for c in chosen):
                result.notes.append("the first layer is float, so the model input is float32 (quantized inside "
                                    "the graph after it); the output stays int8")
            return result

    if precision == "int8" and allow_int16:
        if progress:
            progress("mixed precision: int16 activations", None)
        parity = attempt([], 16, "int16 activations (static_wi8_ai16)")
        if not tolerance.failures(parity.as_dict()):
            result.activation_bits = 16
            result.notes.append("int16 activations (static_wi8_ai16) were needed to meet the int8 tolerance; "
                                "XNNPACK does not run int16 activations, so this file runs on TFLite's kernels")
            return result
    result.float_layers = [c.name for c in chosen]
    result.notes.append(f"no configuration met the {precision} tolerance within {budget} float layers")
    return result
