"""Explicit Q/DQ INT8 ONNX (for TensorRT, and run as-is by ONNX Runtime) and fp16 ONNX.

TensorRT 10+ builds INT8 from explicit QuantizeLinear/DequantizeLinear pairs
(TensorRT 11 only so).  The graph written here follows NVIDIA's placement:

* Q/DQ on the *inputs* of the weighted layers (Conv, ConvTranspose, and
  Gemm/MatMul with a constant weight) only, never on their outputs: TensorRT
  fuses conv + bias + ReLU and requantizes at the next layer's input;
* int8, symmetric, zero point 0 everywhere; weights per channel on axis 0 for
  both Conv (output channels) and ConvTranspose (whose weight is (Ci, Co, kh,
  kw), so axis 0 is its *input* channels): TensorRT's deconvolution kernels
  support only that axis ("We don't support per-output-channel quant for
  ConvTranspose", NVIDIA/TensorRT#2380; axis 1 gave wrong int8 results in
  #1694), and NVIDIA's own quantization toolkits use axis 0;
  activations per tensor with scale ``amax / 127`` from
  :func:`sfedge.quantize.ranges.compute_ranges`;
* bias left in float;
* activation-by-activation MatMuls (the Factorizer's NMF) stay float, as do
  the layers named in ``float_nodes`` (mixed precision).

ONNX Runtime runs such a file by dequantizing into its float kernels, i.e.
it computes exactly the arithmetic TensorRT's int8 kernels approximate, which
is what the parity checks need.

fp16 (:func:`to_fp16`): every float tensor in fp16 except the model's I/O
(kept float32, TensorRT 11's strongly-typed mode takes the types from the
graph) and the NMF nodes (its eps of 1e-8 underflows to 0 in fp16: 0/0 on all-zero windows).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import Artifact, TensorSpec
from sfedge.calibration import CalibrationSet
from sfedge.errors import CalibrationError, ConfigError, ExportError
from sfedge.fileio import atomic_path
from sfedge.onnx_metadata import set_onnx_metadata
from sfedge.parity import Scorer
from sfedge.progress import Progress, tell
from sfedge.quantize.ranges import compute_ranges, write_ranges

__all__ = ["quantize_qdq", "to_fp16", "quantizable_layers", "QUANTIZED_OP_TYPES", "FLOAT_SCOPES"]

QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Node-name scopes kept float32 in every artifact, int8 and fp16 alike (module paths in the
# TorchScript export's node names): the Factorizer's NMF, whose eps (1e-8) underflows in fp16.
FLOAT_SCOPES = ("/nmf/",)


def quantizable_layers(model: Any) -> list[str]:
    """Names of the nodes :func:`quantize_qdq` quantizes: weighted layers with a constant weight, in graph order.

    ``model`` is an ONNX ModelProto or a path.  These are the candidates of the
    sensitivity analysis and the names ``float_nodes`` takes.  Nodes inside
    :data:`FLOAT_SCOPES` (the NMF, whose MatMul with its stored initial factor
    looks like a weighted layer) are never candidates.
    """
    import onnx

    if not hasattr(model, "graph"):
        model = onnx.load(str(model), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES and len(node.input) > 1 and node.input[1] in constants:
            if not any(scope in node.name for scope in FLOAT_SCOPES):
                out.append(node.name)
    return out


def quantize_qdq(
    onnx_artifact: Artifact,
    calib: CalibrationSet,
    path: str | Path,
    *,
    method: str = "entropy",
    float_nodes: Sequence[str] = (),
    ranges: dict[str, float] | None = None,
    reference: np.ndarray | None = None,
    score: Scorer | None = None,
    write_ranges_file: bool = True,
    progress: Progress | None = None,
) -> Artifact:
    """Write the explicit Q/DQ INT8 version of the fp32 ONNX ``onnx_artifact`` to ``path``.

    Why explicit Q/DQ: it is the one INT8 form TensorRT 10 and 11 both build,
    and ONNX Runtime runs it, so the parity measured here is the parity of the
    graph TensorRT gets.  ``ranges`` (from :func:`compute_ranges` with
    ``method``) are computed on ``calib`` when not given; they are written
    beside ``path`` as ``<stem>.ranges-<method>.json``.  ``float_nodes`` are
    layer names (see :func:`quantizable_layers`) kept in float.  With
    ``reference`` (torch outputs for ``calib.holdout``) and ``score`` (how to
    run an ONNX file: the caller's runtime) the artifact's parity is measured.
    """
    import onnx

    path = Path(path)
    src = Path(onnx_artifact.path)
    fp32 = onnx.load(str(src))
    layers = quantizable_layers(fp32)
    unknown = sorted(set(float_nodes) - set(layers))
    if unknown:
        raise ConfigError(
            f"float_nodes name {len(unknown)} node(s) that are not quantizable layers of {src.name}: "
            f"{', '.join(unknown[:3])}",
            f"pick from: {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}",
        )
    if ranges is None:
        ranges = compute_ranges(src, calib, method, progress=progress)
    tell(progress, f"inserting Q/DQ ({len(layers) - len(set(float_nodes))} of {len(layers)} layers in int8)", None)
    with tempfile.TemporaryDirectory(prefix="sfedge-qdq-") as tmp:
        qdq_path = Path(tmp) / "qdq.onnx"
        _ort_quantize(fp32, qdq_path, Path(tmp) / "ranges.json", ranges, method,
                      quantize=[n for n in layers if n not in set(float_nodes)])
        model = onnx.load(str(qdq_path))
    float_list = [n for n in layers if n in set(float_nodes)]
    set_onnx_metadata(model, {"precision": "int8", "calibration": method, "float_layers": float_list,
                              "quantization": "qdq-int8-symmetric"})
    files: list[Path] = []
    meta: dict[str, Any] = {
        "calibration_method": method, "quantized_layers": len(layers) - len(float_list), "layers": len(layers),
        "source_onnx": src.name, "calibration_sha256": getattr(calib, "sha256", None),
    }
    if write_ranges_file:
        ranges_path = path.with_name(f"{path.stem}.ranges-{method}.json")
        write_ranges(ranges_path, ranges, method, onnx=src.name, calibration=getattr(calib, "name", None),
                     calibration_sha256=meta["calibration_sha256"])
        files.append(ranges_path)
        meta["ranges_file"] = ranges_path.name
    with atomic_path(path) as out:
        onnx.save_model(model, str(out), save_as_external_data=False)
    artifact = Artifact(
        path=path, backend=onnx_artifact.backend, kind="onnx", precision="int8",
        inputs=[TensorSpec.from_dict(t.as_dict()) for t in onnx_artifact.inputs],
        outputs=[TensorSpec.from_dict(t.as_dict()) for t in onnx_artifact.outputs],
        float_layers=float_list, files=files, meta=meta,
    )
    if reference is not None and score is not None:
        artifact.parity = score(path, calib.holdout, reference)
    return artifact


def to_fp16(onnx_artifact: Artifact, path: str | Path, *, float_scopes: Sequence[str] = FLOAT_SCOPES) -> Artifact:
    """Write an fp16 copy of the fp32 ONNX ``onnx_artifact`` with float32 input and output.

    Why: TensorRT 11 dropped the FP16 builder flag; its strongly-typed mode
    runs each tensor in the type the graph gives it, so fp16 must be in the
    ONNX.  Nodes whose name contains one of ``float_scopes`` (the NMF) stay
    float32.  ONNX Runtime's CPU EP loads the file but inserts casts to
    float32 around kernels it has only in float32 (fp16 numerics, no speed-up).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = Path(onnx_artifact.path)
    model = onnx.load(str(src))
    blocked = [n.name for n in model.graph.node if any(s in n.name for s in float_scopes)]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # "the float32 value ... was truncated to fp16 min"
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    _keep_blocked_regions_float32(half)
    try:
        onnx.checker.check_model(half, full_check=True)
    except Exception as e:  # onnx ValidationError / InferenceError
        raise ExportError(f"the fp16 graph of {src.name} is invalid: {str(e).splitlines()[0][:200]}",
                          "report this model; use fp32 or int8 meanwhile") from e

    set_onnx_metadata(half, {"precision": "fp16", "float_layers": blocked})
    path = Path(path)
    with atomic_path(path) as out:
        onnx.save_model(half, str(out), save_as_external_data=False)
    return Artifact(
        path=path, backend=onnx_artifact.backend, kind="onnx", precision="fp16",
        inputs=[TensorSpec.from_dict(t.as_dict()) for t in onnx_artifact.inputs],
        outputs=[TensorSpec.from_dict(t.as_dict()) for t in onnx_artifact.outputs],
        float_layers=blocked, meta={"source_onnx": src.name, "io": "float32"},
    )


def _keep_blocked_regions_float32(model: Any) -> None:
    """Repair ONNX Runtime's fp16 converter output so that blocked regions really stay float32.

    The converter keeps every *tensor* fp16 and wraps each blocked node in
    casts (fp16 -> fp32 -> node -> fp32 -> fp16), so a tensor passed between
    two blocked nodes still rounds through fp16 (the NMF's ``+ eps`` is lost
    and all-zero windows give 0/0); it also emits duplicate cast nodes for
    inputs shared by blocked nodes and appends casts out of topological order.
    Here: Cast(fp32) of Cast(fp16) of x becomes x, duplicates and dead nodes
    are dropped and the nodes are sorted topologically.
    """
    from onnx import TensorProto

    graph = model.graph
    nodes, seen = [], set()
    for node in graph.node:
        if tuple(node.output) not in seen:
            seen.add(tuple(node.output))
            nodes.append(node)

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in nodes for o in n.output}
    rename = {}
    for node in nodes:
        src = producer.get(node.input[0]) if node.input else None
        if cast_to(node) == TensorProto.FLOAT and src is not None and cast_to(src) == TensorProto.FLOAT16:
            rename[node.output[0]] = src.input[0]
    for node in nodes:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    outputs = {o.name for o in graph.output}
    while True:  # drop nodes whose outputs nobody reads
        used = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    order, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                order.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError("the fp16 graph has a cycle or a dangling input", "report this model")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)
    del graph.value_info[:]
    used = {i for n in order for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# -- ONNX Runtime's quantizer, driven with our ranges ---------------------------------
def _ort_quantize(src: Any, dst: Path, cache: Path, ranges: dict[str, float], method: str, quantize: list[str]) -> None:
    """quantize_static on the ModelProto ``src`` with precomputed ranges (passed through its calibration cache file).

    Only the layers in ``quantize`` get Q/DQ; every other node of a quantizable
    op type (layers kept float, NMF MatMuls) is excluded by name.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    ort_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}.get(method, CalibrationMethod.MinMax)  # qat: learned ranges
    data = {name: TensorData(lowest=np.array(-amax, np.float32), highest=np.array(amax, np.float32))
            for name, amax in ranges.items()}
    save_tensors_data(TensorsData(ort_method, data), cache)
    wanted = set(quantize)
    excluded = sorted(n.name for n in src.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.name not in wanted)
    missing = [n.name for n in src.graph.node if n.name in wanted and n.input[0] not in ranges]
    if missing:
        raise CalibrationError(f"no calibration range for the input of layer {missing[0]}",
                               "compute the ranges on this same ONNX file")
    # ONNX Runtime's default ConvTranspose axis is 1; TensorRT needs 0 (module docstring).
    weights = {init.name for init in src.graph.initializer}
    deconv_axis0 = {n.input[1]: [{"axis": 0}] for n in src.graph.node
                    if n.op_type == "ConvTranspose" and n.name in wanted and n.input[1] in weights}
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # quantize_static warns about pre-processing on every call
    try:
        quantize_static(
            src, str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=ort_method,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
                "MatMulConstBOnly": True,
                "TensorQuantOverrides": deconv_axis0,
                # Without this ORT rescales weights for an int32 bias we do not make, and fails on axis overrides.
                "QDQDisableWeightAdjustForInt32Bias": True,
            },
            calibration_cache_path=str(cache),
        )
    finally:
        logger.setLevel(level)

