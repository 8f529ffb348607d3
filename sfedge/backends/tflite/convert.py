"""torch -> .tflite with litert-torch (fp32), and fp16 weights via ai-edge-quantizer's float casting.

Layout rule (:func:`tflite_layout`): a TFLite artifact is NHWC, the layout of
every mobile CPU kernel, unless the target's *primary* backend is tflite and
it asks for NCHW.  ``host-cpu`` says NCHW for ONNX Runtime (its primary
backend), so its TFLite artifact is still NHWC.  NHWC I/O comes from
``litert_torch.to_channel_last_io``, which moves the layout change into the
graph's producers and consumers, so no TRANSPOSE sits at the input or output.

Two converter hazards are handled here rather than left to callers
(google-ai-edge/litert-torch#1238): litert-torch bakes a non-contiguous constant in storage order
and silently computes wrong numbers, so every parameter and buffer is made
contiguous first; and its progress log is switched off unless asked for (the
CLI shows its own progress).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sfedge.backends.tflite.quiet import native_stderr_silenced
from sfedge.backends.tflite.rewrite import rewrite_for_litert
from sfedge.errors import BackendUnavailable, ExportError, install_hint
from sfedge.fileio import atomic_path
from sfedge.progress import Progress
from sfedge.targets import Target

__all__ = ["tflite_layout", "convert_float", "cast_weights_fp16", "FP16_OPS", "contiguous_"]


# The ops whose constant weights ai-edge-quantizer's float casting can store as fp16.
FP16_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "FULLY_CONNECTED")


def tflite_layout(target: Target | None) -> str:
    """The I/O layout of a TFLite artifact for ``target``: NHWC unless tflite is its primary backend and it says NCHW.

    A target's ``layout`` describes its primary backend; ONNX Runtime and
    TensorRT want NCHW, but every TFLite CPU kernel is NHWC, so an NCHW
    TFLite file would start and end with a TRANSPOSE.  Only a target built for
    TFLite first may ask for that (e.g. to feed tensors straight from an NCHW
    camera pipeline).
    """
    if target is not None and target.backend == "tflite" and target.layout == "NCHW":
        return "NCHW"
    return "NHWC"


def contiguous_(model: Any) -> Any:
    """Make every parameter and buffer of ``model`` contiguous, in place (litert-torch #1238: see module doc)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.data.is_contiguous():
            t.data = t.data.contiguous()
    return model


@contextlib.contextmanager
def _quiet_litert_torch(show: bool) -> Iterator[None]:
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    os.environ[key] = "y" if show else "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _import_litert_torch():
    try:
        with native_stderr_silenced():
            import litert_torch
    except ImportError as e:
        raise BackendUnavailable("litert-torch is not installed, so torch models cannot be converted to .tflite here",
                                 install_hint("build")) from e
    return litert_torch


def convert_float(
    model: Any,
    input_shape: tuple[int, int, int, int],
    layout: str,
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    verbose: bool = False,
) -> Path:
    """Convert ``model`` (eval mode, NCHW ``input_shape``) to an fp32 .tflite at ``path`` with ``layout`` I/O.

    The file has one signature (``serving_default``) with one input and one
    output; runners find tensors through it, never by generated tensor names.
    Patterns litert-torch cannot convert are rewritten first into equivalent
    ones (:mod:`.rewrite`, on a copy; ``model`` is not changed).
    """
    litert_torch = _import_litert_torch()
    model, _ = rewrite_for_litert(contiguous_(model.eval()), input_shape)
    n, c, h, w = (int(v) for v in input_shape)
    if progress:
        progress(f"litert-torch: converting {type(model).__name__} ({layout})", None)
    if layout == "NHWC":
        module = litert_torch.to_channel_last_io(model, args=[0], outputs=[0]).eval()
        sample = torch.zeros(n, h, w, c)
    elif layout == "NCHW":
        module, sample = model, torch.zeros(n, c, h, w)
    else:
        raise ExportError(f"unknown layout '{layout}' for a TFLite artifact", "use NHWC or NCHW")
    path = Path(path)
    try:
        with _quiet_litert_torch(verbose), torch.no_grad():
            edge = litert_torch.convert(module, (sample,))
            with atomic_path(path) as tmp:
                edge.export(str(tmp))
    except ExportError:
        raise
    except Exception as e:  # the converter raises many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"litert-torch could not convert {type(model).__name__}: {first}",
            "simplify the unsupported op in the model, or build this target with ONNX Runtime",
        ) from e
    return path


def cast_weights_fp16(float_path: str | os.PathLike[str], path: str | os.PathLike[str],
                      keep_float: Sequence[str] = ()) -> list[dict]:
    """Write ``float_path`` with its conv / fully-connected weights stored as fp16; returns the recipe used.

    This is the standard TFLite fp16 model (fp16 constants + DEQUANTIZE to
    fp32): half the file size everywhere, and ARM cores with fp16 arithmetic
    run it in fp16 through XNNPACK; on x86 the weights are up-cast at load and
    it runs at fp32 speed.  It uses ai-edge-quantizer's float casting, the same
    mechanism litert-torch's own FP16 recipe translates to.  ``keep_float``:
    scope regexes left in fp32 (the Factorizer's NMF).
    """
    from ai_edge_quantizer import qtyping, quantizer

    q = quantizer.Quantizer(str(float_path))
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )
    for op in FP16_OPS:
        q.update_quantization_recipe(".*", qtyping.TFLOperationName(op), config, algorithm_key="float_casting")
    for regex in keep_float:
        q.update_quantization_recipe(regex, qtyping.TFLOperationName.ALL_SUPPORTED, algorithm_key="no_quantize")
    result = q.quantize(enable_progress_report=False)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(result.quantized_model))
    return list(q.get_quantization_recipe())
