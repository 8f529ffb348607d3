"""TFLite / LiteRT backend: .tflite artifacts for mobile and ARM CPUs, run with XNNPACK.

* make: torch -> fp32 .tflite (litert-torch, :mod:`.convert`), then fp16
  weights (float casting) or INT8 (ai-edge-quantizer, :mod:`.quantize`:
  full-integer ``int8`` with int8 I/O, or ``int8-dynamic``); every file is
  checked against torch on the held-out split and its op report
  (:mod:`.ops`) is written beside it.
* run: :class:`TFLiteRunner` (:mod:`.runner`), LiteRT's interpreter or the
  tflite-runtime fallback.

Layout rule: NHWC unless the target's primary backend is tflite and it says
NCHW (:func:`tflite_layout`).  The Factorizer's NMF layers stay fp32 in every
precision (their ``eps`` guards underflow in fp16 / int8); the artifact's
``float_layers`` and ``notes`` say so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sfedge.backends.base import Artifact, ModelSource, check_parity
from sfedge.backends.tflite.ops import OpReport, op_report
from sfedge.backends.tflite.runner import TFLiteRunner
from sfedge.errors import UnknownNameError

__all__ = ["RUNNER", "TFLiteRunner", "make", "PRECISIONS", "tflite_layout", "float_tflite", "op_report", "OpReport"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
RUNNER = TFLiteRunner
PROBE_SAMPLES = 8
Progress = Callable[[str, "float | None"], None]


def tflite_layout(target: Any) -> str:
    """NHWC unless ``target``'s primary backend is tflite and it says NCHW (see :mod:`.convert`)."""
    from sfedge.backends.tflite.convert import tflite_layout as rule

    return rule(target)


def _has_nmf(model: Any) -> bool:
    from sfedge.nn import NMF

    return any(isinstance(m, NMF) for m in model.modules())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def float_tflite(source: ModelSource, layout: str, workdir: str | Path, *, progress: Progress | None = None) -> Path:
    """The fp32 .tflite of ``source`` in ``workdir``, converted once per (model, config, weights, shape, layout, converter).

    Conversion takes seconds to tens of seconds; fp16 and INT8 builds start
    from this file, so it is cached under a name derived from everything that
    determines its content.
    """
    from sfedge.backends.tflite.convert import convert_float

    key = json.dumps([source.name, source.config, source.weights_sha256, list(source.input_shape), layout,
                      _versions().get("litert-torch", "")], sort_keys=True, default=str)
    path = Path(workdir) / f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}-{layout.lower()}-fp32.tflite"
    if not path.exists():
        convert_float(source.model, source.input_shape, layout, path, progress=progress)
    return path


def make(
    source: ModelSource,
    target: Any,
    precision: str,
    calibration: Any,
    workdir: str | Path,
    *,
    progress: Progress | None = None,
    runtime: str | None = None,
    max_float_fraction: float = 0.5,
    int16: bool = False,
) -> Artifact:
    """Build the .tflite artifact of ``source`` for ``target`` at ``precision``, parity-checked on the held-out split.

    The float conversion is checked first against the target's fp32
    tolerance (it is what catches the converter's silent bugs); int8 builds
    then keep layers float until ``target.tolerance("int8")`` holds (at most
    ``max_float_fraction`` of the layers); with ``int16`` the last resort is
    int16 activations, which XNNPACK cannot run (slower than fp32 on CPUs, so
    off by default).  Raises ParityError when the final file misses the
    tolerance and ExportError for Flex ops.
    """
    from sfedge.backends.tflite.convert import cast_weights_fp16
    from sfedge.backends.tflite.quantize import NMF_SCOPE, LayerNamer, module_call_order, quantize_tflite, scope_layers
    from sfedge.fileio import write_json
    from sfedge.parity import compare_outputs

    if precision not in PRECISIONS:
        raise UnknownNameError("precision for tflite", precision, list(PRECISIONS))
    target.check_precision(precision)
    layout = tflite_layout(target)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    namer = LayerNamer(module_call_order(source.model, source.input_shape))
    keep_float = [NMF_SCOPE] if _has_nmf(source.model) else []
    notes: list[str] = []

    def score(path: Path, split: str):
        # "probe": a few calibration samples, enough to rank layers by their quantization error.
        data = {"holdout": calibration.holdout, "calibration": calibration.calibration,
                "probe": calibration.calibration[:PROBE_SAMPLES]}[split]
        with TFLiteRunner(path, threads=target.threads, layout=layout, runtime=runtime) as runner:
            return compare_outputs(source.reference(data), runner.run(data))

    float_path = float_tflite(source, layout, workdir, progress=progress)
    if progress:
        progress("checking the fp32 conversion against torch", None)
    fp32_parity = score(float_path, "holdout")
    with TFLiteRunner(float_path, threads=target.threads, layout=layout, runtime=runtime) as runner:
        input_name, signature = runner.inputs[0].name, runner.signature
    check_parity(fp32_parity, target.tolerance("fp32"), f"the fp32 TFLite conversion {float_path.name}")
    float_layers = scope_layers(float_path, NMF_SCOPE, namer, stop_class="NMF_") if keep_float else []
    if float_layers:
        notes.append(f"NMF layers stay fp32 ({len(float_layers)} layer(s)): quantization is applied around them")

    meta: dict[str, Any] = {"layout": layout, "converter": _versions(), "source": source.metadata(),
                            "calibration_sha256": calibration.sha256, "float_file": float_path.name}
    final = workdir / float_path.name.replace("-fp32.tflite", f"-{precision}.tflite")
    if precision == "fp32":
        path, parity = float_path, fp32_parity
    else:
        candidate = final.with_name(f".{final.stem}.candidate.tflite")
        if precision == "fp16":
            meta["recipe"] = cast_weights_fp16(float_path, candidate, keep_float)
            if target.device.get("fp16_arithmetic"):  # XNNPACK computes in fp16 only when the file says so
                from sfedge.backends.tflite.fp16 import FP16_INFERENCE, FP16_NOTE, mark_fp16_inference

                meta["reduced_precision_support"] = FP16_INFERENCE
                mark_fp16_inference(candidate)
                notes.append(f"fp16 weights; {FP16_NOTE}")
            else:
                notes.append("fp16 weights (DEQUANTIZE to fp32 at load), computed in fp32 on every CPU: the target "
                             "has no fp16 arithmetic, so the file carries no reduced-precision metadata")
            parity = score(candidate, "holdout")
        else:
            result = quantize_tflite(
                float_path, candidate, precision,
                samples=calibration.tflite_samples(input_name, layout) if precision == "int8" else None,
                signature=signature, score=score, tolerance=target.tolerance(precision),
                keep_float=keep_float, namer=namer, max_float_fraction=max_float_fraction, allow_int16=int16,
                progress=progress,
            )
            parity = result.parity
            meta["recipe"] = result.recipe
            meta["quantize"] = {k: v for k, v in result.as_dict().items() if k not in ("path", "recipe")}
            float_layers = float_layers + result.float_layers
            notes.extend(result.notes)
        try:
            check_parity(parity, target.tolerance(precision), f"the {precision} TFLite artifact {final.name}")
            report = op_report(candidate)
            report.raise_for_errors()
        except Exception:
            candidate.unlink(missing_ok=True)
            raise
        candidate.replace(final)
        path = final
    if precision == "fp32":
        report = op_report(path)
        report.raise_for_errors()
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
        float_layers=float_layers, parity=parity.as_dict(), files=files, notes=notes, meta=meta,
    )
