"""fp32 .tflite -> INT8 with ai-edge-quantizer: full-integer (int8 in/out) or dynamic-range, with mixed precision.

Why ai-edge-quantizer on the converted file rather than litert-torch's PT2E
flow: PT2E failed on U-Nets with skip concatenation, factorized and
transposed convs (an "... not in ... observer" assertion with litert-torch 0.10); the
quantizer works on any .tflite.

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
* :func:`quantize_tflite` runs the shared mixed-precision search
  (:func:`sfedge.quantize.search.search`, its policies are documented there)
  through :class:`TfliteSearch`: when all-int8 misses the tolerance, each
  weighted op is quantized *alone* and scored on a few calibration samples,
  and the most sensitive ops are kept float one at a time until the held-out
  parity meets the tolerance.  If that is not enough and ``allow_int16``,
  int16 activations (``static_wi8_ai16``) are tried: they recover accuracy
  (demo U-Net: mask agreement 0.9795 -> 0.996) but XNNPACK does not run them,
  and TFLite's own int16 kernels made the demo U-Net slower than fp32, so it
  is opt-in.

Measured on the demo U-Nets: most of the int8 error is the per-tensor int8
quantization of the *normalized input image* (its channels span different
ranges, so the red channel loses about a bit); keeping the first conv float
(and with it the model input) removes it; the ranking puts that layer first.

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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfedge.backends.tflite.ops import read_ops
from sfedge.backends.tflite.quiet import native_stderr_silenced
from sfedge.errors import CalibrationError, ConfigError
from sfedge.fileio import atomic_path
from sfedge.parity import Parity, Scorer, Tolerance
from sfedge.progress import Progress, tell
from sfedge.quantize.search import DEFAULT_MAX_FLOAT_FRACTION, SearchLayer, SearchResult, search

__all__ = [
    "NMF_SCOPE", "NORM_SCOPE", "NORM_CLASSES", "QUANTIZABLE_OPS", "Layer", "QuantizeResult", "weighted_ops", "TfliteSearch",
    "torch_layer_name", "module_call_order", "LayerNamer", "scope_layers", "build_recipe", "calibrate",
    "write_quantized", "quantize_tflite", "io_regexes", "RANGE_METHODS", "choose_ranges",
]

# Scope of every op inside an sfedge NMF layer (litert-torch names tensors by module class path).
NMF_SCOPE = r"sfedge\.nn\.nmf\.NMF_"
# Normalizations that compute statistics at inference (instance, group, layer norm; batch norm is an affine map
# then).  Their mean / variance / rsqrt chain in per-tensor int8 loses the channels with small values (the
# variance of a small channel rounds to a few steps and its rsqrt explodes): on a trained MONAI UNet (instance
# norm) all-int8 held-out agreement was 0.848, 0.915 with these ops float.  Full-integer builds keep them float.
NORM_SCOPE = r"\.(InstanceNorm[123]d|GroupNorm|LayerNorm)_[^/;]*;"
NORM_CLASSES = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.GroupNorm,
                torch.nn.LayerNorm)
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
class QuantizeResult:
    """What :func:`quantize_tflite` produced and how it got there."""

    path: Path
    precision: str
    recipe: list[dict[str, Any]]
    activation_bits: int | None  # None for dynamic range (float activations)
    float_layers: list[str] = field(default_factory=list)  # torch-style names of ops kept float
    parity: Parity | None = None  # held-out parity of the final file
    search: SearchResult | None = None  # what the shared search did (steps, ranking, float cost)
    notes: list[str] = field(default_factory=list)
    range_method: str | None = None  # how the activation ranges were calibrated (RANGE_METHODS)
    range_methods: dict[str, Any] = field(default_factory=dict)  # each method's all-int8 probe parity

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "precision": self.precision, "recipe": self.recipe,
            "activation_bits": self.activation_bits, "float_layers": list(self.float_layers),
            "parity": self.parity.as_dict() if self.parity is not None else None,
            "search": self.search.as_dict() if self.search is not None else None, "notes": list(self.notes),
            "range_method": self.range_method, "range_methods": dict(self.range_methods),
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


def _partial(tensor_name: str, stop_class: str | None = None) -> tuple[str, str]:
    parts = [p.split(";")[0] for p in tensor_name.split(";;")]
    parsed = [_module_path(p, stop_class) for p in parts if p]
    if not parsed:
        return tensor_name, ""
    name, leaf = next(((n, leaf) for n, leaf in parsed if leaf in _LEAF_CLASSES), parsed[-1])
    return (name or tensor_name), leaf


def torch_layer_name(tensor_name: str, stop_class: str | None = None) -> str:
    """The module path (``inc.3.conv_b``) in an op's output tensor name (fused ops: the conv / linear among them).

    litert-torch names tensors by the stack of *called* modules, so a
    ``ModuleList`` (never called itself) is missing from the path:
    ``encoder.0`` and ``decoder.0`` both read ``0``.  :class:`LayerNamer`
    completes such names from the torch model's call order.
    """
    return _partial(tensor_name, stop_class)[0]


def module_call_order(model: Any, input_shape: Sequence[int]) -> list[tuple[str, str]]:
    """(name, class name) of ``model``'s submodules in the order one forward pass calls them (repeats kept)."""
    order: list[tuple[str, str]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append((n, type(_m).__name__)))
             for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return order


class LayerNamer:
    """Full torch module paths for ops, from their tensor names and the model's call order.

    A partial path reached by one module of the right class is that module.
    When several share it, the j-th run of consecutive ops with that path is
    the j-th call, provided there are as many runs as calls; otherwise (the
    converter interleaves or merges ops of identical constant subgraphs) the
    candidates are joined with ``|``.  Without a call order the partial path
    is kept.
    """

    def __init__(self, calls: Sequence[tuple[str, str]] = ()) -> None:
        self.calls = list(calls)

    @property
    def call_order(self) -> list[str]:
        return [n for n, _ in self.calls]

    def candidates(self, partial: str, leaf: str = "") -> list[str]:
        """Modules (in call order, repeats kept) that ``partial`` can stand for.

        The path must end with ``partial``, every module on the part of the
        path it lacks must be one never called (a ModuleList: called modules
        appear in tensor names), and the class must be ``leaf`` when known.
        """
        called = {n for n, _ in self.calls}

        def fits(name: str, cls: str) -> bool:
            if name != partial and not name.endswith("." + partial):
                return False
            prefix = name[: len(name) - len(partial)].rstrip(".").split(".") if name != partial else []
            if any(".".join(prefix[: i + 1]) in called for i in range(len(prefix))):
                return False
            return not leaf or leaf not in _LEAF_CLASSES or cls == leaf

        return [n for n, cls in self.calls if fits(n, cls)]

    def names(self, tensor_names: Sequence[str], stop_class: str | None = None) -> list[str]:
        """One name per op (``tensor_names``: each op's first output tensor, in graph order)."""
        partial = [_partial(t, stop_class) for t in tensor_names]
        run_index, prev = [], None
        runs: dict[tuple[str, str], int] = {}
        for p in partial:
            if p != prev:
                runs[p] = runs.get(p, -1) + 1
            run_index.append(runs[p])
            prev = p
        out = []
        for p, j in zip(partial, run_index):
            calls = self.candidates(*p)
            if len(set(calls)) <= 1:
                out.append(calls[0] if calls else p[0])
            elif runs[p] + 1 == len(calls):
                out.append(calls[j])
            else:
                out.append("|".join(dict.fromkeys(calls)))
        return out


def weighted_ops(float_path: str | os.PathLike[str], namer: LayerNamer | None = None,
                 exclude: Sequence[str] = (), float_input: bool = True) -> list[Layer]:
    """Ops with weights in the main subgraph, in execution order, except those matching ``exclude`` regexes
    and the op that writes the model output (keeping it float would make the output float too).

    With ``float_input`` a layer reading the model input takes the input with
    it when kept float; without (int8 I/O), the input stays int8 whatever
    stays float.
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
        for t in (set(op.input_ids) & set(io.get("inputs", []))) if float_input else ():
            regexes.append("^" + re.escape(io["input_names"][io["inputs"].index(t)]) + ";")
        out.append(Layer(name, op.op, tuple(regexes)))
    return out


def scope_layers(float_path: str | os.PathLike[str], regex: str, namer: LayerNamer | None = None,
                 stop_class: str | None = None) -> list[str]:
    """Every module (deduplicated, in call order when known) owning an op whose scope matches ``regex``."""
    graphs, _ = read_ops(float_path)
    namer = namer or LayerNamer()
    partial = dict.fromkeys(_partial(op.outputs[0], stop_class) for op in (graphs[0] if graphs else [])
                            if op.outputs and re.search(regex, ";".join(op.outputs) + ";"))
    found = {c for p in partial for c in namer.candidates(p[0])}
    if not namer.calls:
        return [p[0] for p in partial]
    return [c for c in dict.fromkeys(namer.call_order) if c in found]


def io_regexes(float_path: str | os.PathLike[str]) -> list[str]:
    """Regexes that keep the model's input tensor and the op writing its output float (``--float-io``).

    ai-edge-quantizer has no switch for float I/O in a static int8 recipe;
    leaving the input tensor unquantized makes it float32 (a QUANTIZE op
    follows it) and leaving the last op (the head, a few MACs) float makes
    the output float32.
    """
    graphs, io = read_ops(float_path)
    out = ["^" + re.escape(name) + ";" for name in io.get("input_names", [])]
    outputs = set(io.get("outputs", []))
    out += ["^" + re.escape(op.outputs[0]) + ";" for op in (graphs[0] if graphs else [])
            if op.outputs and set(op.output_ids) & outputs]
    return out


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
def _quiet() -> Any:
    # The quantizer draws tqdm bars on stderr and its calibrator warns that it keeps every tensor (it must);
    # the CLI shows its own progress.
    with native_stderr_silenced(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        yield


# How the activation ranges come from the calibration samples (see :func:`calibrate`).
RANGE_METHODS = ("moving-average", "minmax")


def _widen(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """ai-edge-quantizer QSV update keeping the extremes over every sample seen (``minmax``)."""
    if not old:
        return new
    return {**new, "min": np.minimum(old["min"], new["min"]), "max": np.maximum(old["max"], new["max"])}


def calibrate(float_path: str | os.PathLike[str], samples: list[dict[str, Any]], signature: str,
              recipe: list[dict[str, Any]], method: str = "moving-average") -> dict[str, Any]:
    """Min/max of every tensor over ``samples`` (ai-edge-quantizer QSVs), reusable for any recipe on the same file.

    ``moving-average`` is ai-edge-quantizer's own update: each sample's
    min/max is folded in with weight 0.05, so a range is a typical sample's,
    and values beyond it clip.  ``minmax`` keeps the extremes over every
    sample: nothing on the calibration split clips, at the cost of coarser
    steps.  Which is better depends on the model: on the demo U-Nets the
    moving average (held-out agreement 0.979 vs 0.964 with every layer int8);
    on a MONAI UNet, whose per-crop input ranges differ widely, the moving
    average clipped the model input to [-0.32, 2.12] while the held-out
    images reach -1.80 (cosine 0.935 vs 0.985; 0.971 vs 0.9998 with batch
    norm).  :func:`quantize_tflite` tries both and keeps one.
    """
    from ai_edge_quantizer import calibrator, quantizer, recipe_manager

    if not samples:
        raise CalibrationError("the calibration split is empty", "give a calibration set with at least one sample")
    if method not in RANGE_METHODS:
        raise ConfigError(f"unknown TFLite range method '{method}'", f"use one of {', '.join(RANGE_METHODS)}")
    threads = max(1, min(2, os.cpu_count() or 1))
    if method == "moving-average":
        q = quantizer.Quantizer(str(float_path), recipe)
        with _quiet():
            return q.calibrate({signature: samples}, num_threads=threads)
    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(recipe)
    with _quiet():
        c = calibrator.Calibrator(str(float_path), num_threads=threads, qsv_update_func=_widen)
        c.calibrate({signature: samples}, rm)
        return c.get_model_qsvs()


def choose_ranges(float_path: Path, samples: list[dict[str, Any]], signature: str, recipe: list[dict[str, Any]],
                  score: Scorer, probe: tuple[np.ndarray, np.ndarray], methods: Sequence[str] = RANGE_METHODS,
                  progress: Progress | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Calibrate with each range method and keep the one whose all-int8 file scores best on the probe samples.

    The probe split (calibration samples), not the held-out split that
    gates, chooses (the search's policy 2).  Returns the method, its QSVs and
    what each method scored.
    """
    tried: dict[str, Any] = {}
    best: tuple[tuple[float, float], str, dict[str, Any]] | None = None
    candidate = Path(float_path).with_name(f".{Path(float_path).stem}.ranges.tflite")
    for method in methods:
        tell(progress, f"activation ranges: {method}")
        qsvs = calibrate(float_path, samples, signature, recipe, method)
        if len(methods) == 1:
            return method, qsvs, tried
        try:
            write_quantized(float_path, candidate, recipe, qsvs)
            parity = score(candidate, *probe)
        finally:
            candidate.unlink(missing_ok=True)
        tried[method] = parity.as_dict()
        key = (parity.dice_agreement if parity.dice_agreement is not None else parity.cosine, -parity.mean_abs)
        if best is None or key > best[0]:
            best = (key, method, qsvs)
    assert best is not None
    return best[1], best[2], tried


def write_quantized(float_path: str | os.PathLike[str], path: str | os.PathLike[str], recipe: list[dict[str, Any]],
                    qsvs: dict[str, Any] | None) -> Path:
    """Quantize ``float_path`` with ``recipe`` (and calibration ``qsvs`` for static recipes) into ``path``."""
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(float_path), recipe)
    with _quiet():
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


# TFLite op -> the ONNX op type the shared search reports use (one vocabulary for both backends).
_ONNX_OP = {"TRANSPOSE_CONV": "ConvTranspose", "FULLY_CONNECTED": "Gemm", "BATCH_MATMUL": "MatMul"}


class TfliteSearch:
    """ai-edge-quantizer as a :class:`sfedge.quantize.search.SearchAdapter`; each build writes ``path``.

    A candidate keeps ``keep_float`` scopes and the chosen layers' regexes
    float (a layer reading the model input takes the input with it); a probe
    quantizes one layer alone.  ``costs`` are MACs per torch module name.
    """

    def __init__(self, float_path: Path, path: Path, precision: str, qsvs: dict[str, Any] | None,
                 layers: Sequence[Layer], keep_float: Sequence[str], activation_bits: int, score: Scorer,
                 holdout: tuple[np.ndarray, np.ndarray], probe: tuple[np.ndarray, np.ndarray],
                 costs: dict[str, float] | None = None) -> None:
        self.float_path, self.path, self.precision, self.qsvs = float_path, path, precision, qsvs
        self._layers = {layer.name: layer for layer in layers}
        self.keep_float, self.activation_bits, self.score = list(keep_float), activation_bits, score
        self.holdout, self.probe_data, self.costs = holdout, probe, costs or {}
        self.recipe: list[dict[str, Any]] = []

    def layers(self) -> Sequence[SearchLayer]:
        return [SearchLayer(name, _ONNX_OP.get(layer.op, "Conv")) for name, layer in self._layers.items()]

    def build(self, float_layers: Sequence[str]) -> Parity:
        extra = [rx for name in float_layers for rx in self._layers[name].regexes]
        self.recipe = build_recipe(self.precision, [*self.keep_float, *extra], self.activation_bits)
        write_quantized(self.float_path, self.path, self.recipe, self.qsvs)
        return self.score(self.path, *self.holdout)

    def probe(self, layer: str) -> Parity:
        probe = self.path.with_name(f".{self.float_path.stem}.probe.tflite")
        try:
            write_quantized(self.float_path, probe, _only(self._layers[layer].regexes, self.precision), self.qsvs)
            return self.score(probe, *self.probe_data)
        finally:
            probe.unlink(missing_ok=True)

    def cost(self, layer: str) -> float:
        return float(sum(self.costs.get(part, 0) for part in layer.split("|")))


def quantize_tflite(
    float_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    precision: str,
    *,
    samples: list[dict[str, Any]] | None,
    signature: str,
    score: Scorer,
    holdout: tuple[np.ndarray, np.ndarray],
    probe: tuple[np.ndarray, np.ndarray],
    tolerance: Tolerance,
    keep_float: Sequence[str] = (),
    namer: LayerNamer | None = None,
    costs: dict[str, float] | None = None,
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION,
    allow_int16: bool = False,
    float_io: bool = False,
    search_costs: dict[str, float] | None = None,
    shifted: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Progress | None = None,
    _ranked: Sequence[Any] = (),
) -> QuantizeResult:
    """Quantize ``float_path`` to ``precision`` with the shared search, keeping layers float until ``tolerance`` holds.

    ``score(path, inputs, reference)`` runs a .tflite and compares it with
    torch; ``holdout`` (inputs, torch outputs) is what gates, ``probe`` what
    ranks.  The result holds the last file written; the caller gates it (the
    search may run out of float budget).  With ``allow_int16``, int16
    activations are the last resort (XNNPACK does not run them, see the
    module docstring).  Full-integer files take and give int8 unless
    ``float_io`` (then float32 in and out, see :func:`io_regexes`);
    ``search_costs`` ({layer: measured ms}) replace ``costs`` (MACs) in the
    search's ranking; ``shifted`` (inputs, torch outputs) must also meet the
    shifted split's floor.  When int8 I/O cannot meet the gate within the
    float budget (the input and output steps themselves flip mask pixels: the
    trained demo U-Net stays at agreement 0.9797 with 8 of 17 layers float),
    the search runs once more with float I/O, reusing the layer probes, and
    the notes say so; ``--qat`` is the way to int8 I/O then.
    """
    float_path, path = Path(float_path), Path(path)
    if float_io and precision == "int8":
        keep_float = [*keep_float, *io_regexes(float_path)]
    activation_bits = 8 if precision == "int8" else None
    base = build_recipe(precision, keep_float, activation_bits or 8)
    method, qsvs, tried = (choose_ranges(float_path, samples or [], signature, base, score, probe,
                                         progress=progress) if precision == "int8" else (None, None, {}))
    tell(progress, f"ai-edge-quantizer: {precision}" + (f" ({method} ranges)" if method else ""))
    layers = weighted_ops(float_path, namer, exclude=keep_float, float_input=float_io)
    adapter = TfliteSearch(float_path, path, precision, qsvs, layers, keep_float, activation_bits or 8, score,
                           holdout, probe, costs)
    shifted_score = (lambda: score(adapter.path, *shifted)) if shifted is not None else None
    found = search(adapter, tolerance, max_float_fraction=max_float_fraction, costs=search_costs, shifted=shifted_score,
                   ranked=_ranked, progress=progress)
    if not found.met and precision == "int8" and not float_io:
        tell(progress, "int8 I/O missed the gate: searching again with float I/O")
        retry = quantize_tflite(float_path, path, precision, samples=samples, signature=signature, score=score,
                                holdout=holdout, probe=probe, tolerance=tolerance, keep_float=keep_float, namer=namer,
                                costs=costs, max_float_fraction=max_float_fraction, allow_int16=allow_int16,
                                float_io=True, search_costs=search_costs, shifted=shifted, progress=progress,
                                _ranked=found.sensitivity)
        if retry.search is not None and retry.search.met:
            retry.notes.insert(0, f"int8 input and output could not meet the int8 tolerance (held-out "
                                  f"{found.parity.summary()} with {len(found.float_layers)} layer(s) float): this file "
                                  "takes and gives float32; `--qat STEPS` tunes the model for int8 I/O")
            retry.notes = [n for n in retry.notes if not n.startswith("float I/O (--float-io)")]
            return retry
        adapter.build(found.float_layers)  # neither met: keep the int8-I/O candidate (the caller's gate fails it)
    result = QuantizeResult(path, precision, adapter.recipe, activation_bits, list(found.float_layers), found.parity,
                            search=found, range_method=method, range_methods=tried)
    note = found.note()
    if note:
        result.notes.append(note)
    if float_io and precision == "int8":
        result.notes.append("float I/O (--float-io): the model input and output are float32, quantized and "
                            "dequantized inside the graph")
    if found.met or not (precision == "int8" and allow_int16):
        return result
    tell(progress, "mixed precision: int16 activations")
    result.recipe = build_recipe(precision, keep_float, 16)
    write_quantized(float_path, path, result.recipe, qsvs)
    result.parity = score(path, *holdout)
    result.float_layers = []
    if not tolerance.failures(result.parity):
        result.activation_bits = 16
        result.notes = ["int16 activations (static_wi8_ai16) were needed to meet the int8 tolerance; XNNPACK does "
                        "not run int16 activations, so this file runs on TFLite's kernels"]
    return result
