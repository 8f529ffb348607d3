"""TFLite / LiteRT, build side: .tflite artifacts for mobile and ARM CPUs, each gated against torch.

torch -> fp32 .tflite (litert-torch, :mod:`.convert`), then fp16 weights
(float casting) or INT8 (ai-edge-quantizer, :mod:`.quantize`: full-integer
``int8`` with int8 I/O, or ``int8-dynamic``); every file is checked against
torch on the held-out split with :class:`TFLiteRunner` and its op report
(:mod:`.ops`) is written beside it.

Layout rule: NHWC unless the target's primary backend is tflite and it says
NCHW (:func:`sfedge.backends.tflite.convert.tflite_layout`).  The
Factorizer's NMF layers stay fp32 in every precision (their ``eps`` guards
underflow in fp16 / int8); the artifact's ``float_layers`` and ``notes`` say so.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import Artifact
from sfedge.backends.int8 import Int8Options, qat_tflite
from sfedge.backends.tflite.convert import cast_weights_fp16, convert_float, tflite_layout
from sfedge.backends.tflite.fp16 import FP16_INFERENCE, FP16_NOTE, mark_fp16_inference
from sfedge.backends.tflite.ops import op_report
from sfedge.backends.tflite.quantize import (
    NMF_SCOPE,
    NORM_CLASSES,
    NORM_SCOPE,
    LayerNamer,
    module_call_order,
    quantize_tflite,
    scope_layers,
)
from sfedge.backends.tflite.rewrite import rewrite_notes
from sfedge.backends.tflite.runner import TFLiteRunner
from sfedge.calibration import CalibrationSet
from sfedge.errors import UnknownNameError
from sfedge.fileio import write_json
from sfedge.nn import NMF, macs_by_module
from sfedge.parity import Parity, Scorer, gate, measure
from sfedge.progress import Progress, scaled, tell
from sfedge.quantize.mixed import PROBE_SAMPLES
from sfedge.quantize.search import DEFAULT_MAX_FLOAT_FRACTION
from sfedge.source import ModelSource
from sfedge.targets import Target

__all__ = ["make", "float_tflite", "tflite_scorer", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def tflite_scorer(threads: int | None, layout: str, runtime: str | None = None, task: str = "binary") -> Scorer:
    """A scorer that runs a .tflite with the target's threads and layout and judges it for ``task``."""

    def score(path: Path, inputs: np.ndarray, reference: np.ndarray) -> Parity:
        with TFLiteRunner(path, threads=threads, layout=layout, runtime=runtime) as runner:
            return measure(runner, inputs, reference, task)

    return score


def float_tflite(source: ModelSource, layout: str, workdir: str | Path, *, progress: Progress | None = None) -> Path:
    """The fp32 .tflite of ``source`` in ``workdir``, converted once per (model, config, weights, shape, layout, converter).

    Conversion takes seconds to tens of seconds; fp16 and INT8 builds start
    from this file, so it is cached under a name derived from everything that
    determines its content.
    """
    key = json.dumps([source.name, source.config, source.weights_sha256, list(source.input_shape), layout,
                      _versions().get("litert-torch", "")], sort_keys=True, default=str)
    path = Path(workdir) / f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}-{layout.lower()}-fp32.tflite"
    if not path.exists():
        convert_float(source.model, source.input_shape, layout, path, progress=progress)
    return path


def make(
    source: ModelSource,
    target: Target,
    precision: str,
    calibration: CalibrationSet,
    workdir: Path,
    *,
    progress: Progress | None = None,
    runtime: str | None = None,
    int16: bool = False,
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION,
    int8: Int8Options | None = None,
) -> Artifact:
    """Build the .tflite artifact of ``source`` for ``target`` at ``precision``, gated on the held-out split.

    The float conversion is gated first against the target's fp32 tolerance
    (it is what catches the converter's silent bugs); int8 builds then run
    the shared mixed-precision search; with ``int16`` the last resort is int16
    activations, which XNNPACK cannot run (slower than fp32 on CPUs, so off by
    default); ``max_float_fraction`` is the search's float budget.  ``int8``
    (:class:`sfedge.backends.int8.Int8Options`): with ``qat_steps`` the model
    is first fine-tuned in the TFLite int8 scheme and its tuned weights are
    converted and recalibrated by ai-edge-quantizer; ``float_io`` gives the
    full-integer file float32 I/O (default: int8 in and out); ``costs`` are
    measured per-layer ms for the search.  Where the calibration set has a
    shifted split, the artifact is gated on it too.  Raises ParityError when the final file misses the tolerance
    (nothing of it is left) and ExportError for Flex ops.
    """
    options = int8 or Int8Options()
    if precision not in PRECISIONS:
        raise UnknownNameError("precision for tflite", precision, list(PRECISIONS))
    target.check_precision(precision)
    layout = tflite_layout(target)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    qat_record = None
    built = source  # what is converted: the model, or its QAT-tuned copy for int8 with --qat
    if precision == "int8" and options.qat_steps:
        built, run = qat_tflite(source, calibration, options.qat_config, progress=scaled(progress, 0.0, 0.5))
        qat_record = run.as_dict()
    namer = LayerNamer(module_call_order(built.model, built.input_shape))
    keep_float = [NMF_SCOPE] if any(isinstance(m, NMF) for m in source.model.modules()) else []
    notes: list[str] = []
    score = tflite_scorer(target.threads, layout, runtime, source.task)
    holdout = (calibration.holdout, source.reference(calibration.holdout))

    notes.extend(rewrite_notes(source.model))
    float_path = float_tflite(built, layout, workdir, progress=progress)
    tell(progress, "checking the fp32 conversion against torch")
    built_holdout = holdout if built is source else (calibration.holdout, built.reference(calibration.holdout))
    fp32_parity = gate(score(float_path, *built_holdout), target.tolerance("fp32"),
                       f"the fp32 TFLite conversion {float_path.name}", cleanup=[float_path])
    with TFLiteRunner(float_path, threads=target.threads, layout=layout, runtime=runtime) as runner:
        input_name, signature = runner.inputs[0].name, runner.signature
    float_layers = scope_layers(float_path, NMF_SCOPE, namer, stop_class="NMF_") if keep_float else []
    if float_layers:
        notes.append(f"NMF layers stay fp32 ({len(float_layers)} layer(s)): quantization is applied around them")

    meta: dict[str, Any] = {"layout": layout, "converter": _versions(), "source": source.metadata(),
                            "calibration_sha256": calibration.sha256, "float_file": float_path.name}
    path = float_path.with_name(float_path.name.replace("-fp32.tflite", f"-{precision}.tflite"))
    if precision == "fp32":
        path, parity = float_path, fp32_parity
    elif precision == "fp16":
        meta["recipe"] = cast_weights_fp16(float_path, path, keep_float)
        if target.device.get("fp16_arithmetic"):  # XNNPACK computes in fp16 only when the file says so
            meta["reduced_precision_support"] = FP16_INFERENCE
            mark_fp16_inference(path)
            notes.append(f"fp16 weights; {FP16_NOTE}")
        else:
            notes.append("fp16 weights (DEQUANTIZE to fp32 at load), computed in fp32 on every CPU: the target "
                         "has no fp16 arithmetic, so the file carries no reduced-precision metadata")
        parity = score(path, *holdout)
    else:
        probe = calibration.calibration[:PROBE_SAMPLES]
        int8_float = list(keep_float)
        n_norm = sum(isinstance(m, NORM_CLASSES) for m in source.model.modules()) if precision == "int8" else 0
        if n_norm:
            int8_float.append(NORM_SCOPE)
            notes.append(f"instance/group/layer norm stays fp32 ({n_norm} module(s)): their statistics in "
                         "per-tensor int8 lose the small channels; quantization is applied around them")
        result = quantize_tflite(
            float_path, path, precision,
            samples=calibration.tflite_samples(input_name, layout) if precision == "int8" else None,
            signature=signature, score=score, holdout=holdout, probe=(probe, source.reference(probe)),
            tolerance=target.tolerance(precision), keep_float=int8_float, namer=namer,
            costs={k: float(v) for k, v in macs_by_module(built.model, built.input_shape).items()},
            max_float_fraction=max_float_fraction, allow_int16=int16, float_io=options.float_io,
            search_costs=dict(options.costs) if options.costs else None, progress=progress,
            shifted=(calibration.shifted, source.reference(calibration.shifted))
            if calibration.has_shifted and calibration.shifted is not None else None,
        )
        assert result.parity is not None
        parity = result.parity
        meta["recipe"] = result.recipe
        meta["quantize"] = {k: v for k, v in result.as_dict().items() if k not in ("path", "recipe")}
        float_layers = float_layers + result.float_layers
        notes.extend(result.notes)
        meta["int8_options"] = options.as_dict()
        if qat_record is not None:
            meta["qat"] = qat_record
            notes.append(f"quantization-aware fine-tuning: {qat_record['steps']} steps ({qat_record['seconds']:.0f} s) "
                         "by distillation from the fp32 model in the TFLite int8 scheme; ai-edge-quantizer "
                         "recalibrated the tuned weights")
    what = f"the {precision} TFLite artifact {path.name}"
    cleanup = [] if path == float_path else [path]
    gate(parity, target.tolerance(precision), what, cleanup=cleanup)
    shifted_parity = None
    if calibration.has_shifted:
        assert calibration.shifted is not None
        shifted_parity = gate(score(path, calibration.shifted, source.reference(calibration.shifted)),
                              target.tolerance(precision).for_shifted(), what, cleanup=cleanup, split="shifted held-out")
    report = op_report(path)
    try:
        report.raise_for_errors()
    except Exception:
        path.unlink(missing_ok=True)
        raise
    report.path = str(path)
    report_path = write_json(path.with_suffix(".ops.json"), report.as_dict(per_op=True))
    meta["op_report"] = report.summary()
    files = [report_path]
    if "recipe" in meta:
        files.append(write_json(path.with_suffix(".recipe.json"), meta["recipe"]))
    with TFLiteRunner(path, threads=target.threads, layout=layout, runtime=runtime) as runner:
        inputs, outputs = runner.inputs, runner.outputs
        meta["runtime"] = runner.versions()
    return Artifact(
        path=path, backend="tflite", kind="tflite", precision=precision, inputs=inputs, outputs=outputs,
        float_layers=float_layers, parity=parity, files=files, notes=notes, meta=meta, shifted_parity=shifted_parity,
    )
