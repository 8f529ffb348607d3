"""INT8 for the Q/DQ ONNX backends (ONNX Runtime, TensorRT): QAT or calibration, both range methods, search by cost.

One function, :func:`qdq_int8`, turns a gated fp32 ONNX into the int8 Q/DQ
ONNX both backends ship:

* with ``Int8Options.qat_steps`` > 0, quantization-aware fine-tuning
  (:mod:`sfedge.quantize.qat`, scheme ``qdq``) tunes a BN-folded copy of the
  model through the exact Q/DQ arithmetic, the tuned model is exported (and
  gated against its own torch outputs at the fp32 tolerance), and the Q/DQ
  file is written with the *learned* ranges (method ``qat``);
* without, every method in ``Int8Options.methods`` (default entropy and
  percentile) calibrates the ranges;
* each candidate runs the one mixed-precision search
  (:func:`sfedge.quantize.search.search`, gain per cost) and the one that
  meets the gate with the least float cost wins (ties: the first listed); a
  method whose all-int8 file already meets the gate with no float layer ends
  the comparison, since nothing can cost less.

The manifest's ``mixed_precision`` record says, per method, what it reached
and what its float layers cost; ``qat`` what the fine-tuning did.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfedge.artifact import Artifact
from sfedge.calibration import CalibrationSet
from sfedge.errors import ConfigError
from sfedge.export import export_onnx
from sfedge.parity import Scorer, Tolerance
from sfedge.progress import Progress, scaled, tell
from sfedge.quantize.mixed import PROBE_SAMPLES, mixed_precision
from sfedge.quantize.qat import QatConfig, QatModel, QatResult, copy_for_qat, finetune, match_onnx_layers
from sfedge.quantize.qdq import quantizable_layers, quantize_qdq
from sfedge.quantize.ranges import METHODS, compute_ranges
from sfedge.quantize.search import DEFAULT_MAX_FLOAT_FRACTION, SearchResult
from sfedge.source import ModelSource

__all__ = ["Int8Options", "qdq_int8", "qat_qdq", "qat_tflite", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("entropy", "percentile")


@dataclass(frozen=True)
class Int8Options:
    """How an int8 build quantizes (the CLI's --qat, --float-io, --method; recorded in the build key).

    ``costs`` ({layer name: measured ms}, from a latency table) replace MACs
    as the price of a float layer in the search.
    """

    qat_steps: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    float_io: bool = False
    costs: Mapping[str, float] | None = None
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION
    qat: QatConfig = field(default_factory=QatConfig)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown calibration method(s) {', '.join(bad) or '(none given)'}",
                              f"valid methods: {', '.join(METHODS)}")
        if self.qat_steps < 0:
            raise ConfigError(f"--qat takes a number of steps >= 0, got {self.qat_steps}", "e.g. --qat 150")

    def as_dict(self) -> dict[str, Any]:
        return {"qat_steps": self.qat_steps, "methods": list(self.methods), "float_io": self.float_io,
                "costs": "measured" if self.costs else "macs", "max_float_fraction": self.max_float_fraction,
                "qat": self.qat.as_dict() if self.qat_steps else None}

    @property
    def qat_config(self) -> QatConfig:
        return replace(self.qat, steps=self.qat_steps) if self.qat_steps else self.qat


def qat_qdq(source: ModelSource, calib: CalibrationSet, workdir: Path, score: Scorer, fp32_tolerance: Tolerance,
            config: QatConfig, samples: np.ndarray | None = None, progress: Progress | None = None,
            before_strip: Callable[[QatModel], None] | None = None,
            ) -> tuple[Artifact, dict[str, float], QatResult, QatModel]:
    """QAT in the Q/DQ scheme; the tuned model's fp32 ONNX (in ``workdir``), its learned ranges, the run, the QAT model.

    The returned :class:`QatModel` is already stripped (its ``model`` is the
    tuned float model the ONNX was exported from).  ``samples`` default to
    the calibration split; ``before_strip`` sees the fine-tuned model with
    its fake quantization still attached (tests compare it with the file).
    """
    workdir = Path(workdir)
    example = torch.from_numpy(np.ascontiguousarray(calib.calibration[:1]))
    student, folded = copy_for_qat(source.model, example)
    folded_src = replace(source, model=student, name=f"{source.name}-qat", _reference={})
    tell(progress, "QAT: exporting the BN-folded model to place the quantizers", 0.0)
    pre = export_onnx(folded_src, workdir / "qat-folded.onnx", score=score, tolerance=fp32_tolerance,
                      check_inputs=calib.holdout[:2])
    import onnx

    model = onnx.load(str(pre.path), load_external_data=False)
    layers = quantizable_layers(model)
    nodes = {n.name: n for n in model.graph.node}
    ranges0 = compute_ranges(pre.path, calib, "entropy", progress=scaled(progress, 0.05, 0.1))
    mapping = match_onnx_layers(model, student, layers)
    groups: dict[str, tuple[list[str], float, float]] = {}
    for layer, module in mapping.items():
        tensor = nodes[layer].input[0]
        names, _, amax = groups.get(tensor, ([], 0.0, ranges0[tensor]))
        groups[tensor] = ([*names, module], -amax, amax)
    qat = QatModel(student, "qdq", groups)
    result = finetune(qat, source.model, calib.calibration if samples is None else samples, task=source.task,
                      config=config, folded=folded, progress=scaled(progress, 0.15, 0.7))
    learned = {qat.owner[m]: qat.quantizer(qat.owner[m]).amax() for m in mapping.values()}  # by pre-export tensor
    module_amax = {m: learned[qat.owner[m]] for m in mapping.values()}
    if before_strip is not None:
        before_strip(qat)
    tuned = qat.strip()
    tuned_src = replace(source, model=tuned, name=f"{source.name}-qat", _reference={})
    tell(progress, "QAT: exporting the tuned model", 0.88)
    fp32 = export_onnx(tuned_src, workdir / "qat-tuned.onnx", score=score, tolerance=fp32_tolerance,
                       check_inputs=calib.holdout[:2])
    model = onnx.load(str(fp32.path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    ranges = {nodes[layer].input[0]: module_amax[module]
              for layer, module in match_onnx_layers(model, tuned, quantizable_layers(model)).items()}
    Path(pre.path).unlink(missing_ok=True)
    return fp32, ranges, result, qat


def qdq_int8(
    source: ModelSource,
    fp32: Artifact,
    calib: CalibrationSet,
    path: Path,
    *,
    tolerance: Tolerance,
    fp32_tolerance: Tolerance,
    score: Scorer,
    options: Int8Options | None = None,
    progress: Progress | None = None,
) -> tuple[Artifact, SearchResult, dict[str, float]]:
    """The int8 Q/DQ ONNX of ``source`` at ``path`` (not yet gated: the caller gates), its search, its ranges.

    ``fp32`` is the gated fp32 export of ``source``.  See the module
    docstring for QAT, the methods and how the winner is chosen.
    """
    options = options or Int8Options()
    path = Path(path)
    holdout = calib.holdout
    reference = source.reference(holdout)
    probe = calib.calibration[:PROBE_SAMPLES]
    probe_reference = source.reference(probe)
    shifted_reference = source.reference(calib.shifted) if calib.has_shifted and calib.shifted is not None else None
    qat_record: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="sfedge-int8-") as tmp_name:
        tmp = Path(tmp_name)
        if options.qat_steps:
            base, qat_ranges, run, _ = qat_qdq(source, calib, tmp, score, fp32_tolerance, options.qat_config,
                                               progress=scaled(progress, 0.0, 0.6))
            candidates: list[tuple[str, dict[str, float]]] = [("qat", qat_ranges)]
            qat_record = run.as_dict()
            span = (0.6, 0.4)
        else:
            base, candidates, span = fp32, [], (0.0, 1.0)
        tried: dict[str, dict[str, Any]] = {}
        best: tuple[str, dict[str, float], SearchResult] | None = None
        methods: Sequence[str] = [c[0] for c in candidates] or list(options.methods)
        step = span[1] / len(methods)
        for i, method in enumerate(methods):
            sub = scaled(progress, span[0] + i * step, step)
            ranges = dict(candidates)[method] if candidates else compute_ranges(base.path, calib, method, progress=sub)
            _, result = mixed_precision(
                base, calib, tmp / f"candidate-{method}.onnx", reference=reference, probe_reference=probe_reference,
                tolerance=tolerance, score=score, ranges=ranges, method=method, costs=options.costs,
                max_float_fraction=options.max_float_fraction, shifted_reference=shifted_reference, progress=sub,
            )
            tried[method] = {"met": result.met, "float_layers": list(result.float_layers),
                             "float_cost": result.float_cost, "total_cost": result.total_cost,
                             "all_int8_parity": result.all_int8_parity.as_dict(), "parity": result.parity.as_dict()}
            if best is None or _better(result, best[2]):
                best = (method, ranges, result)
            if result.met and not result.float_layers:
                for rest in methods[i + 1:]:
                    tried[rest] = {"skipped": f"{method} met the gate with every layer in int8"}
                break
        assert best is not None
        method, ranges, result = best
        tell(progress, f"writing the int8 Q/DQ ONNX ({method} ranges, {len(result.float_layers)} float layers)", 0.98)
        artifact = quantize_qdq(base, calib, path, method=method, float_nodes=result.float_layers, ranges=ranges,
                                reference=reference, score=score)
    artifact.meta["mixed_precision"] = {k: v for k, v in result.as_dict().items() if k != "sensitivity"}
    artifact.meta["mixed_precision"]["method"] = method
    artifact.meta["mixed_precision"]["methods"] = tried
    artifact.meta["sensitivity"] = [s.as_dict() for s in result.sensitivity]
    artifact.meta["int8_options"] = options.as_dict()
    if qat_record is not None:
        artifact.meta["qat"] = qat_record
        artifact.notes.append(f"quantization-aware fine-tuning: {qat_record['steps']} steps "
                              f"({qat_record['seconds']:.0f} s) by distillation from the fp32 model; the Q/DQ "
                              "scales are the learned ones and the weights the tuned ones")
    note = result.note()
    if note:
        artifact.notes.append(note)
    return artifact, result, ranges


def _better(a: SearchResult, b: SearchResult) -> bool:
    """Whether search result ``a`` beats ``b``: meeting the gate first, then less float cost, then agreement."""
    if a.met != b.met:
        return a.met
    if a.met:
        return a.float_cost < b.float_cost
    da, db = a.parity.dice_agreement, b.parity.dice_agreement
    return (da if da is not None else a.parity.cosine) > (db if db is not None else b.parity.cosine)



@torch.no_grad()
def _minmax(model: torch.nn.Module, names: Sequence[str], samples: np.ndarray) -> tuple[dict, dict]:
    """(input, output) (min, max) of each named module over ``samples``: the TFLite scheme's initial ranges."""
    modules = dict(model.named_modules())
    ins: dict[str, list[float]] = {}
    outs: dict[str, list[float]] = {}

    def keep(store: dict[str, list[float]], name: str, t: torch.Tensor) -> None:
        lo, hi = float(t.min()), float(t.max())
        old = store.get(name)
        store[name] = [min(lo, old[0]), max(hi, old[1])] if old else [lo, hi]

    def hook(name: str) -> Callable[..., None]:
        def record(_m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            keep(ins, name, args[0])
            keep(outs, name, out)

        return record

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for i in range(len(samples)):
            model(torch.from_numpy(np.ascontiguousarray(samples[i : i + 1])))
    finally:
        for h in hooks:
            h.remove()
    return {n: tuple(v) for n, v in ins.items()}, {n: tuple(v) for n, v in outs.items()}


def qat_tflite(source: ModelSource, calib: CalibrationSet, config: QatConfig, samples: np.ndarray | None = None,
               progress: Progress | None = None) -> tuple[ModelSource, QatResult]:
    """QAT in the TFLite scheme; the tuned (BN-folded) model as a new :class:`ModelSource`, and the run.

    ai-edge-quantizer recalibrates the tuned model's .tflite (it takes
    statistics per TFLite tensor, not these torch-side ranges): see
    :mod:`sfedge.quantize.qat`.
    """
    from sfedge.models.specs import weights_sha256
    from sfedge.quantize.qat import weighted_modules

    data = calib.calibration if samples is None else samples
    example = torch.from_numpy(np.ascontiguousarray(data[:1]))
    student, folded = copy_for_qat(source.model, example)
    names = [n for n, _ in weighted_modules(student)]
    ins, outs = _minmax(student, names, data[: min(len(data), 16)])
    groups = {n: ([n], *ins[n]) for n in names if n in ins}
    qat = QatModel(student, "tflite", groups, {n: outs[n] for n in names if n in outs})
    run = finetune(qat, source.model, data, task=source.task, config=config, folded=folded, progress=progress)
    tuned = qat.strip()
    tuned_src = replace(source, model=tuned, name=f"{source.name}-qat", weights_sha256=weights_sha256(tuned.state_dict()),
                        _reference={})
    return tuned_src, run
