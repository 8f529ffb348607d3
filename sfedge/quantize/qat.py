"""Quantization-aware fine-tuning (QAT): int8 without float fallbacks.

Post-training calibration leaves the rank-r intermediates of SFConv models
(and the normalized input image of every model) with more int8 error than the
0.98 mask-agreement gate allows, so the mixed-precision search keeps layers in
float.  Here the model is fine-tuned *through* the int8 arithmetic of the
target, so the weights and the activation ranges adapt to it, and the
exported artifact uses exactly the learned scales.

**Library.**  The quantizer arithmetic is torch's own fake-quantize ops:
``torch._fake_quantize_learnable_per_tensor_affine`` (LSQ / LSQ+: learnable
scale and zero point, straight-through rounding; the op behind
``torch.ao.quantization._LearnableFakeQuantize``) for activations and
``torch.fake_quantize_per_channel_affine`` for weights; the weight
quantizer is attached with ``torch.nn.utils.parametrize``, the activation
quantizer as a forward pre-hook, so the model keeps its own modules (and the
flattening regularizer its SFConv layers).  torchao is installed beside
torch 2.13 (litert-torch brings it) but its QAT flow swaps modules for its
own and targets linear layers; nothing of it is needed here.

**Schemes** (:data:`SCHEMES`), one per int8 writer sfedge has:

* ``qdq`` (the explicit Q/DQ ONNX for ONNX Runtime and TensorRT,
  :mod:`sfedge.quantize.qdq`): fake quantization exactly where the Q/DQ
  writer puts Q/DQ: the *input* of every weighted layer (Conv,
  ConvTranspose, Linear), int8 symmetric per tensor (zero point 0,
  [-128, 127] with scale amax/127, initialised from the calibrated ranges),
  and the weights int8 symmetric per channel on axis 0 (ConvTranspose
  included, its axis 0 being input channels), scale max|w|/127 per channel
  as ONNX Runtime's quantizer computes it.  BatchNorm is folded into the
  conv before it first (the ONNX export folds it too), so the weights
  quantized in torch are the ones quantized in the file.  Layers that read
  the same tensor share one quantizer (ONNX Runtime keys ranges by tensor).
  Export: the tuned, folded model is exported to ONNX and its Q/DQ graph
  written with the learned ranges ({input tensor: 127 * scale}); ONNX
  Runtime on that file agrees with the fake-quantized torch model to within
  float rounding (tested).
* ``tflite`` (ai-edge-quantizer ``static_wi8_ai8``): weights int8 symmetric
  per *output* channel (ConvTranspose: torch axis 1), activations int8
  asymmetric per tensor (learnable scale and zero point) at the inputs and
  outputs of the weighted layers.  ai-edge-quantizer takes calibration
  statistics per TFLite tensor, not ranges for torch modules, and quantizes
  every tensor of the graph (adds, concatenations, pooling) with its own
  min/max rule, so the TFLite path *recalibrates* the QAT-tuned weights with
  ai-edge-quantizer's calibrator: the weights are what QAT gives TFLite.

**Objective.**  Label-free distillation from the fp32 model (the teacher) on
the calibration images, so it works for any user's model: for a mask task the
soft cross-entropy to the teacher's probabilities (what decides which pixels
flip) plus a small logit MSE; for regression the MSE.  Labels join the loss
where the caller has them (``labels``).  The flattening regularizer
(:func:`sfedge.nn.flatness.flatness_loss`) keeps SFConv spectra flat, as in
training.  The loop is the trainer's (AdamW, cosine schedule); it is its own
function because the data are the calibration set's preprocessed samples
(random crops and flips), not the demo photograph's labelled crops.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from sfedge.errors import CalibrationError, ConfigError
from sfedge.nn.flatness import flatness_loss
from sfedge.nn.losses import task_loss
from sfedge.progress import Progress, tell

__all__ = [
    "SCHEMES", "QatConfig", "QatResult", "ActQuant", "WeightQuant", "QatModel", "fold_batchnorm",
    "weighted_modules", "match_onnx_layers", "distill_loss", "finetune",
]

SCHEMES = ("qdq", "tflite")
WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
FLOAT_MODULE_SCOPES = ("nmf",)  # module-path parts never quantized (the Factorizer's NMF; qdq.FLOAT_SCOPES in ONNX)


@dataclass(frozen=True)
class QatConfig:
    """One QAT run (its fields go into the build key and the manifest)."""

    steps: int = 150
    batch: int = 4
    crop: int = 128
    lr: float = 1e-4  # weights
    scale_lr: float = 5e-3  # log of each activation scale (relative steps)
    flatness_weight: float = 1e-3
    mse_weight: float = 0.1
    label_weight: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QatResult:
    """What a QAT run did: the loss curve, time, and the learned activation ranges per quantizer."""

    scheme: str
    steps: int
    seconds: float
    losses: list[float]
    folded_batchnorm: list[str]
    quantizers: int
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["losses"] = [round(v, 6) for v in self.losses[:: max(1, len(self.losses) // 20)]]
        d["first_loss"] = self.losses[0] if self.losses else None
        d["last_loss"] = float(np.mean(self.losses[-10:])) if self.losses else None
        return d


class ActQuant(nn.Module):
    """Per-tensor int8 fake quantization with a learnable scale (LSQ) and, asymmetric, a learnable zero point.

    ``scale = init * exp(log_gain)``: the optimizer moves the scale in
    relative steps whatever its magnitude.  Symmetric: zero point 0 and the
    full int8 range [-128, 127], which is what QuantizeLinear saturates to.
    """

    def __init__(self, low: float, high: float, symmetric: bool) -> None:
        super().__init__()
        self.symmetric = symmetric
        if symmetric:
            amax = max(abs(low), abs(high), 1e-8)
            init, zp = amax / 127.0, 0.0
        else:
            low, high = min(low, 0.0), max(high, 0.0)  # TFLite ranges always contain 0
            init = max(high - low, 1e-8) / 255.0
            zp = float(np.clip(-128 - round(low / init), -128, 127))
        self.register_buffer("init", torch.tensor([init], dtype=torch.float32))
        self.log_gain = nn.Parameter(torch.zeros(1))
        self.zero_point = nn.Parameter(torch.tensor([zp]), requires_grad=not symmetric)

    @property
    def scale(self) -> torch.Tensor:
        return self.init * torch.exp(self.log_gain)

    def amax(self) -> float:
        """The symmetric range the Q/DQ writer takes (scale * 127)."""
        return float(self.scale.detach()) * 127.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, -128, 127, 1.0)


class WeightQuant(nn.Module):
    """Per-channel int8 symmetric fake quantization of a weight, scale max|w|/127 per channel (a parametrization).

    The scale follows the weight (as ONNX Runtime and ai-edge-quantizer compute
    it at export), rounding passes gradients straight through; an all-zero
    channel gets scale 1 (ONNX Runtime's rule for a zero range).
    """

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(w.ndim) if d != self.axis]
        amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
        zp = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zp, self.axis, -128, 127)


def weighted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer a scheme quantizes: Conv2d, ConvTranspose2d, Linear outside float scopes."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, WEIGHTED) and not any(p.lower().startswith(s) for p in n.split(".") for s in FLOAT_MODULE_SCOPES)]


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Fold every eval-mode BatchNorm that directly follows a conv into it, in place; the folded BN names.

    Why: the ONNX export folds Conv + BatchNorm, so per-channel weight
    quantization in the file sees the folded weights; QAT must quantize the
    same ones.  Pairs are found with ``torch.fx`` (a BN whose only input is a
    conv output used nowhere else); the BN becomes ``nn.Identity``.  A model
    fx cannot trace is left unfolded (the caller notes it).
    """
    from torch.fx import symbolic_trace
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    try:
        graph = symbolic_trace(model).graph
    except Exception:  # fx cannot trace every user model (data-dependent control flow)
        return []
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        bn = modules[node.target]
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or bn.running_mean is None:
            continue
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias, transpose=isinstance(conv, nn.ConvTranspose2d))
        conv.weight = nn.Parameter(w.detach().contiguous())
        conv.bias = nn.Parameter(b.detach().contiguous())
        parent_name, _, attr = node.target.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
        folded.append(node.target)
    with torch.no_grad():
        model(example)  # still runs
    return folded


def match_onnx_layers(onnx_model: Any, model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """{ONNX node name: torch module name} for the quantizable ``layers``, matched by their weights.

    The export of a BN-folded model carries each conv's weight unchanged, so
    equal weights identify the module whatever the exporter named the node.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx_model.graph.initializer}
    nodes = {n.name: n for n in onnx_model.graph.node}
    torch_w = [(name, m.weight.detach().numpy()) for name, m in weighted_modules(model)]
    out: dict[str, str] = {}
    used: set[str] = set()
    for layer in layers:
        node = nodes[layer]
        t = inits.get(node.input[1])
        if t is None:
            continue
        w = numpy_helper.to_array(t)
        cands = [n for n, tw in torch_w if n not in used and tw.shape == w.shape and np.allclose(tw, w, rtol=1e-5, atol=1e-7)]
        if not cands and w.ndim == 2:  # Gemm without transB, MatMul: (K, N)
            cands = [n for n, tw in torch_w if n not in used and tw.shape == w.T.shape and np.allclose(tw, w.T, rtol=1e-5, atol=1e-7)]
        if not cands:
            raise ConfigError(f"QAT cannot find the torch layer of ONNX node {layer} (no weight matches)",
                              "build without --qat; report this model")
        out[layer] = cands[0]
        used.add(cands[0])
    return out


class QatModel:
    """A deep copy of a model with fake quantization attached for a scheme; :meth:`strip` gives the tuned float model.

    ``groups`` lists, per activation quantizer, the torch modules whose input
    it quantizes (``qdq``: modules reading one ONNX tensor share one) and the
    initial (low, high) range.  For ``tflite`` the weighted layers' outputs
    are quantized too (``output_groups``).
    """

    def __init__(self, model: nn.Module, scheme: str, groups: dict[str, tuple[list[str], float, float]],
                 output_ranges: dict[str, tuple[float, float]] | None = None) -> None:
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown QAT scheme '{scheme}'", f"valid schemes: {', '.join(SCHEMES)}")
        self.scheme = scheme
        self.model = model
        modules = dict(model.named_modules())
        symmetric = scheme == "qdq"
        self.quantizers = nn.ModuleDict()
        self.owner: dict[str, str] = {}  # module name -> group key
        self._hooks = []
        for i, (key, (names, low, high)) in enumerate(groups.items()):
            q = ActQuant(low, high, symmetric)
            self.quantizers[f"in{i}"] = q
            for n in names:
                self.owner[n] = key
                self._hooks.append(modules[n].register_forward_pre_hook(_pre_hook(q)))
        self.key_of = {key: f"in{i}" for i, key in enumerate(groups)}
        for i, (n, (low, high)) in enumerate((output_ranges or {}).items()):
            q = ActQuant(low, high, False)
            self.quantizers[f"out{i}"] = q
            self._hooks.append(modules[n].register_forward_hook(_post_hook(q)))
        self.weighted = [n for n, _ in weighted_modules(model)]
        for n in self.weighted:
            m = modules[n]
            axis = 1 if (scheme == "tflite" and isinstance(m, nn.ConvTranspose2d)) else 0
            parametrize.register_parametrization(m, "weight", WeightQuant(axis))

    def quantizer(self, key: str) -> ActQuant:
        """The activation quantizer of group ``key``."""
        q = self.quantizers[self.key_of[key]]
        assert isinstance(q, ActQuant)
        return q

    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(model weights, quantizer parameters) for the optimizer's two groups."""
        return [p for p in self.model.parameters() if p.requires_grad], [
            p for p in self.quantizers.parameters() if p.requires_grad]

    def strip(self) -> nn.Module:
        """Remove the fake quantization (hooks and parametrizations), keep the tuned float weights; the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        modules = dict(self.model.named_modules())
        for n in self.weighted:
            if parametrize.is_parametrized(modules[n], "weight"):
                parametrize.remove_parametrizations(modules[n], "weight", leave_parametrized=False)
        for p in self.model.parameters():
            p.data = p.data.contiguous()
        return self.model.eval()


def _pre_hook(q: ActQuant) -> Any:
    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (q(args[0]), *args[1:])

    return hook


def _post_hook(q: ActQuant) -> Any:
    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return q(out)

    return hook


def distill_loss(task: str, student: torch.Tensor, teacher: torch.Tensor, mse_weight: float = 0.1) -> torch.Tensor:
    """Label-free distillation for what the output means.

    binary / multilabel: cross-entropy to the teacher's sigmoid probabilities
    (its gradient, sigmoid(s) - sigmoid(t), is largest where a pixel can flip);
    multiclass: KL to the teacher's softmax; plus ``mse_weight`` times the
    logit MSE normalised by the teacher's variance; regression: that MSE alone.
    """
    mse = F.mse_loss(student, teacher) / teacher.var().clamp_min(1e-8)
    if task in ("binary", "multilabel"):
        soft = F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
        soft = soft - F.binary_cross_entropy_with_logits(teacher, torch.sigmoid(teacher))  # 0 at the teacher
        return soft + mse_weight * mse
    if task == "multiclass":
        return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                        reduction="batchmean") / student[0, 0].numel() + mse_weight * mse
    return mse


def _batches(samples: np.ndarray, config: QatConfig, rng: np.random.Generator, divisor: int,
             labels: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, _, h, w = samples.shape
    crop = max(divisor, min(config.crop, h, w) // divisor * divisor)
    idx = rng.integers(0, n, config.batch)
    xs, ys = [], []
    for i in idx:
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        x = samples[i, :, y0 : y0 + crop, x0 : x0 + crop]
        lab = labels[i, :, y0 : y0 + crop, x0 : x0 + crop] if labels is not None else None
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
            lab = lab[:, :, ::-1] if lab is not None else None
        if rng.random() < 0.5:
            x = x[:, ::-1]
            lab = lab[:, ::-1] if lab is not None else None
        xs.append(np.ascontiguousarray(x))
        if lab is not None:
            ys.append(np.ascontiguousarray(lab))
    return torch.from_numpy(np.stack(xs)), (torch.from_numpy(np.stack(ys)) if ys else None)


def finetune(
    qat: QatModel,
    teacher: nn.Module,
    samples: np.ndarray,
    *,
    task: str = "binary",
    config: QatConfig = QatConfig(),
    labels: np.ndarray | None = None,
    folded: Sequence[str] = (),
    progress: Progress | None = None,
) -> QatResult:
    """Fine-tune ``qat`` (in place) to match ``teacher`` through its fake quantization on ``samples`` (N, C, H, W).

    ``labels`` (same N and size; class maps for multiclass) add the task's
    supervised loss.  Deterministic for a given ``config.seed``.
    """
    if len(samples) == 0:
        raise CalibrationError("QAT needs calibration samples and the calibration split is empty",
                               "give a calibration set with samples")
    if config.steps < 1:
        raise ConfigError(f"QAT steps must be >= 1, got {config.steps}", "e.g. --qat 150")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    divisor = int(getattr(qat.model, "divisor", 1) or 1)
    weights, qparams = qat.parameters()
    opt = torch.optim.AdamW([{"params": weights, "lr": config.lr, "weight_decay": 0.0},
                             {"params": qparams, "lr": config.scale_lr, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    teacher.eval()
    qat.model.eval()  # BN (folded or frozen) keeps its statistics; QAT trains weights and scales only
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        x, y = _batches(samples, config, rng, divisor, labels)
        with torch.no_grad():
            t = teacher(x)
        s = qat.model(x)
        loss = distill_loss(task, s, t, config.mse_weight)
        if y is not None and config.label_weight > 0:
            loss = loss + config.label_weight * task_loss(task, s, y)
        if config.flatness_weight > 0:
            loss = loss + flatness_loss(qat.model, config.flatness_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step + 1 == config.steps:
            tell(progress, f"QAT step {step + 1}/{config.steps}: loss {losses[-1]:.4g}", (step + 1) / config.steps)
    return QatResult(qat.scheme, config.steps, round(time.perf_counter() - start, 2), losses, list(folded),
                     len(qat.quantizers), config.as_dict())


def copy_for_qat(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with BatchNorm folded into its convs (the student QAT tunes) and the folded BN names."""
    student = copy.deepcopy(model).eval()
    for p in student.parameters():
        p.requires_grad_(True)
    folded = fold_batchnorm(student, example)
    return student, folded
