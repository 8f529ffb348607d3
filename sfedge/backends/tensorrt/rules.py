"""A static lint of an ONNX file against what TensorRT's ONNX parser accepts.

An engine is built on the device, minutes after the ONNX left the
workstation; every rule here turns a build failure (or a silently wrong
engine) on the Jetson into a one-line error at export time.  Each violation
names the node (or graph input/output) that breaks it.

Rules, by id:

* ``opset``          default-domain opset inside the parser's range for the release
* ``static-shape``   every graph input and output has fixed, positive dimensions
* ``rank``           every tensor (after ONNX shape inference) has rank <= 8
* ``unsupported-op`` the op is in the parser's support table for the release (no custom domains)
* ``op-restriction`` documented restrictions of supported ops (Resize modes, 2D/3D pooling, Einsum ellipsis on 8.x)
* ``qdq-type``       Q/DQ quantize to INT8 (not UINT8; FP8/INT4 are TensorRT 10+ types sfedge does not build)
* ``qdq-zero-point`` Q/DQ zero points are constant and all zero (TensorRT is symmetric-only)
* ``qdq-scale``      Q/DQ scales are constant and positive
* ``qdq-block``      no block quantization (TensorRT only has it for INT4/FP4 weights)
* ``qdq-weight-axis`` per-channel weight scales on axis 0 for Conv *and* ConvTranspose weights
* ``qdq-activation`` activations are quantized per tensor
* ``implicit-int8``  an INT8 build of a strongly typed network (TensorRT 11, or 10 with --stronglyTyped) needs Q/DQ
* ``fp16-in-graph``  an FP16 build of a strongly typed network needs FP16 tensors in the ONNX

Sources, so the tables can be re-checked when a release changes:

* operator tables and opset ranges: onnx/onnx-tensorrt ``docs/operators.md`` on
  branch release/8.5-GA ("TensorRT 8.5 supports operators up to Opset 17") and
  release/10.0 ("TensorRT 10.0 supports operators in the inclusive range of
  opset 9 to opset 20"), the 10.15 version ("opset 9 to opset 24"), and
  ``docs/Changelog.md`` for what each 10.x release added; TensorRT 11 from the
  11.2 operators.md header ("opset 9 to opset 24") -- the 11.x ONNX Opset Guide
  says 25 for the newest 11.x, we keep the lower bound until a 11.x target exists.
* Q/DQ: the same tables ("`x_zero_point` must be zero", QuantizeLinear types
  FP32/FP16, DequantizeLinear INT8 on 8.5; INT8/FP8/FP4/INT4 on 10.x).
* ConvTranspose weight axis: TensorRT's int8 deconvolution kernels quantize
  weights per *input* channel, which is axis 0 of ONNX's (C_in, C_out/g, kH, kW)
  layout -- NVIDIA/TensorRT#2380 ("the kernels assume per-input-channel quant
  for ConvTranspose ... We don't support per-output-channel quant for
  ConvTranspose") and #1694 (axis-1 deconv weights gave "obviously wrong"
  INT8 results; NVIDIA's answer: use axis 0); with C_in != C_out (every U-Net
  up-convolution) axis-1 weights failed to build at all (NVIDIA/TensorRT#1519,
  onnx/onnx-tensorrt#751).  NVIDIA's Model Optimizer
  quantizes ConvTranspose weights on axis 0 for the same reason.  onnxruntime's
  quantizer defaults ConvTranspose weights to axis 1 (onnxruntime#19996), so this
  rule fires on its per-channel output unless the axis is overridden.
* ONNX IR version is not checked: TensorRT 8.5's parser only logs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sfedge.backends.tensorrt.version import format_version, is_strongly_typed, parse_version
from sfedge.errors import ExportError

__all__ = [
    "Violation", "lint_onnx", "check_onnx", "supported_ops", "opset_range", "RULES",
]

RULES = (
    "opset", "static-shape", "rank", "unsupported-op", "op-restriction", "qdq-type", "qdq-zero-point",
    "qdq-scale", "qdq-block", "qdq-weight-axis", "qdq-activation", "implicit-int8", "fp16-in-graph",
)
MAX_RANK = 8  # TensorRT's Dims::MAX_DIMS

# -- support tables (see the module docstring for their sources) --------------------------------------------------
# Opset range of the parser, keyed by the first release it applies to.  8.x is
# backward compatible to opset 7 (TensorRT 8 developer guide), 10.x to opset 9.
_OPSET_RANGES: dict[tuple[int, int], tuple[int, int]] = {
    (8, 5): (7, 17),
    (8, 6): (7, 17),
    (10, 0): (9, 20),
    (10, 15): (9, 24),
    (11, 0): (9, 24),
}

# Operators marked "Y" in onnx-tensorrt release/8.5-GA docs/operators.md.
_OPS_8_5 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal
Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# 8.6 EA changelog: "Added support for GroupNormalization, LayerNormalization, IsInf operations".
_OPS_8_6 = _OPS_8_5 | {"GroupNormalization", "LayerNormalization", "IsInf"}
# 10.x: the 10.15 table minus what the changelog says later releases added.  Hardmax came in 9.2.
# Gelu, Mish, CastLike and Attention are in the 10.15 table but not traced to a release: treated as 10.15+.
_OPS_10_15 = frozenset(_OPS_8_6 | {
    "Attention", "BlackmanWindow", "CastLike", "DeformConv", "Gelu", "HammingWindow", "HannWindow", "Hardmax",
    "Mish", "RMSNormalization", "RotaryEmbedding", "STFT", "TensorScatter",
})
_OPS_10_0 = _OPS_10_15 - {
    "Attention", "BlackmanWindow", "CastLike", "DeformConv", "Gelu", "HammingWindow", "HannWindow", "Mish",
    "RMSNormalization", "RotaryEmbedding", "STFT", "TensorScatter",
}
_SUPPORTED_OPS: dict[tuple[int, int], frozenset[str]] = {
    (8, 5): _OPS_8_5,
    (8, 6): _OPS_8_6,
    (10, 0): _OPS_10_0,
    (10, 1): _OPS_10_0 | {"DeformConv"},
    (10, 4): _OPS_10_0 | {"DeformConv", "BlackmanWindow", "HammingWindow", "HannWindow"},
    (10, 5): _OPS_10_0 | {"DeformConv", "BlackmanWindow", "HammingWindow", "HannWindow", "STFT"},
    (10, 15): _OPS_10_15,
    (11, 0): _OPS_10_15,
}
_RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_Row = TypeVar("_Row")


def _entry(table: dict[tuple[int, int], _Row], version: tuple[int, int, int]) -> _Row:
    """The table row for the newest release at or below ``version`` (tables list only releases that changed)."""
    key = max(k for k in table if k <= version[:2])
    return table[key]


def supported_ops(tensorrt_version: str) -> frozenset[str]:
    """Default-domain ONNX ops the parser of ``tensorrt_version`` imports (without plugins)."""
    return _entry(_SUPPORTED_OPS, parse_version(tensorrt_version))


def opset_range(tensorrt_version: str) -> tuple[int, int]:
    """(lowest, highest) default-domain opset the parser of ``tensorrt_version`` accepts."""
    return _entry(_OPSET_RANGES, parse_version(tensorrt_version))


@dataclass(frozen=True)
class Violation:
    """One broken rule: which, where (node name, or the graph input/output name) and why."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message} [{self.rule}]"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# -- the graph view the rules read ---------------------------------------------------------------------------------
class _Graph:
    """Constants, element types, shapes and producers of a (function-inlined, shape-inferred) model."""

    def __init__(self, model: Any) -> None:
        import onnx
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for node in _all_nodes(graph):
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, i))
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | str | None]] = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                        for d in tt.shape.dim]
        for init in graph.initializer:
            self.types.setdefault(init.name, init.data_type)
            self.shapes.setdefault(init.name, list(init.dims))
        self._onnx = onnx

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def is_constant_origin(self, name: str) -> bool:
        """True for initializers/Constants and for Q(constant) outputs (weights given in float and quantized)."""
        if name in self.constants:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "QuantizeLinear" and node.input[0] in self.constants

    def type_name(self, elem_type: int) -> str:
        return str(self._onnx.TensorProto.DataType.Name(elem_type))


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Nodes of ``graph`` and of every subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_name(node: Any) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def _load(path_or_model: str | os.PathLike[str] | Any) -> Any:
    import onnx

    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        if not path.is_file():
            raise ExportError(f"ONNX file {path} does not exist", "export the model first")
        try:
            return onnx.load(str(path))
        except Exception as e:  # protobuf raises DecodeError and friends on damaged files
            raise ExportError(f"cannot read ONNX file {path}: {e}", "re-export the model") from e
    return path_or_model


def _prepare(model: Any) -> Any:
    """Inline model-local functions and run shape inference, so every tensor has a type and (usually) a shape."""
    import onnx
    from onnx import inliner, shape_inference

    model = inliner.inline_local_functions(model) if model.functions else onnx.ModelProto.FromString(
        model.SerializeToString())
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort: rules that need shapes skip tensors without them
        return model


# -- the rules ---------------------------------------------------------------------------------------------------
def _check_opset(g: _Graph, version: tuple[int, int, int]) -> Iterator[Violation]:
    lo, hi = _entry(_OPSET_RANGES, version)
    for entry in g.model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS and not lo <= entry.version <= hi:
            yield Violation("opset", "<model>",
                            f"opset {entry.version} is outside TensorRT {format_version(version)}'s range {lo}-{hi}; "
                            f"export with opset {hi} or lower")


def _check_static_shapes(g: _Graph) -> Iterator[Violation]:
    graph = g.model.graph
    initializers = {i.name for i in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for vi in values:
            if vi.name in initializers:
                continue
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                if kind == "input":  # an output without shape info is fine: TensorRT infers it from the inputs
                    yield Violation("static-shape", vi.name, "graph input has no shape; export with a fixed input shape")
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            if any(not isinstance(d, int) or d <= 0 for d in dims):
                yield Violation("static-shape", vi.name,
                                f"graph {kind} has dynamic shape {dims}; sfedge builds static engines "
                                "(export without dynamic axes)")


def _check_rank(g: _Graph) -> Iterator[Violation]:
    for name, shape in g.shapes.items():
        if len(shape) > MAX_RANK:
            producer = g.producer.get(name)
            yield Violation("rank", _node_name(producer) if producer else name,
                            f"tensor '{name}' has rank {len(shape)} > {MAX_RANK}, TensorRT's limit; "
                            "rewrite the op with <= 8-D tensors")


def _check_ops(g: _Graph, version: tuple[int, int, int]) -> Iterator[Violation]:
    ops = _entry(_SUPPORTED_OPS, version)
    v = format_version(version)
    for node in _all_nodes(g.model.graph):
        where = _node_name(node)
        if node.domain not in _DEFAULT_DOMAINS:
            yield Violation("unsupported-op", where,
                            f"{node.domain}::{node.op_type} is not an ONNX standard op; TensorRT needs a plugin for it")
        elif node.op_type not in ops:
            yield Violation("unsupported-op", where, f"{node.op_type} is not supported by TensorRT {v}'s ONNX parser")
        else:
            yield from _check_restrictions(g, node, version)


def _check_restrictions(g: _Graph, node: Any, version: tuple[int, int, int]) -> Iterator[Violation]:
    where = _node_name(node)
    op = node.op_type
    if op == "Resize":
        mode = _attr(node, "mode", "nearest")
        ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        if mode not in _RESIZE_MODES:
            yield Violation("op-restriction", where, f"Resize mode '{mode}' is unsupported (nearest or linear only)")
        if ctm not in _RESIZE_COORDINATE_MODES:
            yield Violation("op-restriction", where, f"Resize coordinate_transformation_mode '{ctm}' is unsupported")
        if mode == "nearest" and nearest not in _RESIZE_NEAREST_MODES:
            yield Violation("op-restriction", where, f"Resize nearest_mode '{nearest}' is unsupported")
        if _attr(node, "antialias", 0):
            yield Violation("op-restriction", where, "Resize antialiasing is unsupported")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        shape = g.shapes.get(node.input[0])
        if shape is not None and len(shape) not in (4, 5):
            yield Violation("op-restriction", where, f"{op} on a rank-{len(shape)} tensor: 2D or 3D pooling only")
        dilations = _attr(node, "dilations")
        if dilations and any(d != 1 for d in dilations):
            yield Violation("op-restriction", where, f"{op} dilations {list(dilations)} are unsupported (all ones only)")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            yield Violation("op-restriction", where, "MaxPool Indices output is unsupported")
    elif op == "Einsum" and version[0] < 10 and "..." in str(_attr(node, "equation", "")):
        yield Violation("op-restriction", where,
                        f"Einsum with an ellipsis is unsupported by TensorRT {format_version(version)}; "
                        "spell out the dimensions (or permute/reshape)")


def _check_qdq(g: _Graph, version: tuple[int, int, int]) -> Iterator[Violation]:
    import onnx

    int8 = onnx.TensorProto.INT8
    newer_types = {onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN}
    for node in _all_nodes(g.model.graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in _DEFAULT_DOMAINS:
            continue
        where = _node_name(node)
        scale = g.constant(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zero_point = g.constant(zp_name)
        # -- type: the quantized side of the pair
        if node.op_type == "QuantizeLinear":
            # Without a zero point or output_dtype, ONNX quantizes to uint8.
            qtype = (g.types.get(node.output[0]) or g.types.get(zp_name) or _attr(node, "output_dtype", 0)
                     or onnx.TensorProto.UINT8)
        else:
            qtype = g.types.get(node.input[0])
        if qtype and qtype != int8:
            tname = g.type_name(qtype)
            if qtype in newer_types and version[0] >= 10:
                msg = (f"{tname} Q/DQ: TensorRT {format_version(version)} accepts it, but sfedge builds INT8 only "
                       "(Orin and Xavier have no FP8 tensor cores); quantize to int8")
            else:
                msg = f"{tname} Q/DQ is unsupported; TensorRT needs int8 (quantize with QInt8 activations and weights)"
            yield Violation("qdq-type", where, msg)
        # -- zero point and scale
        if zp_name and zero_point is None:
            yield Violation("qdq-zero-point", where, "zero point is computed at run time; TensorRT needs a constant 0")
        elif zero_point is not None and np.any(zero_point != 0):
            yield Violation("qdq-zero-point", where,
                            f"zero point {np.unique(zero_point)[:4].tolist()} is not 0; TensorRT quantization is "
                            "symmetric (ActivationSymmetric/WeightSymmetric)")
        if scale is None:
            yield Violation("qdq-scale", where, "scale is computed at run time; TensorRT needs a constant scale")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            yield Violation("qdq-scale", where, "scale has zero, negative or non-finite values")
        if _attr(node, "block_size", 0):
            yield Violation("qdq-block", where, "block quantization is unsupported for INT8 (per-tensor or per-channel only)")
        # -- granularity
        per_channel = scale is not None and scale.size > 1
        if not per_channel:
            continue
        if not g.is_constant_origin(node.input[0]):
            yield Violation("qdq-activation", where,
                            f"activation '{node.input[0]}' is quantized per channel; TensorRT needs per-tensor "
                            "activation scales")
            continue
        if node.op_type != "DequantizeLinear":
            continue
        axis = int(_attr(node, "axis", 1))
        rank = len(g.shapes.get(node.input[0], [])) or None
        if rank is not None and axis < 0:
            axis += rank
        for consumer, index in g.consumers.get(node.output[0], []):
            if consumer.op_type in ("Conv", "ConvTranspose") and index == 1 and axis != 0:
                yield Violation(
                    "qdq-weight-axis", _node_name(consumer),
                    f"{consumer.op_type} weight '{node.input[0]}' is quantized per channel on axis {axis}; TensorRT "
                    f"needs axis 0" + (" (its int8 deconvolution kernels quantize per input channel, "
                                      "NVIDIA/TensorRT#2380)" if consumer.op_type == "ConvTranspose" else ""),
                )


def _check_precision(g: _Graph, version: tuple[int, int, int], typed: bool, precision: str | None) -> Iterator[Violation]:
    import onnx

    if precision is None or not typed:
        return
    v = format_version(version)
    if precision == "int8" and not any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in _all_nodes(g.model.graph)
    ):
        yield Violation("implicit-int8", "<model>",
                        f"an int8 build for TensorRT {v} (strongly typed) needs Q/DQ nodes: implicit INT8 with a "
                        "calibration cache does not exist there; quantize the ONNX with Q/DQ")
    if precision == "fp16" and onnx.TensorProto.FLOAT16 not in set(g.types.values()):
        yield Violation("fp16-in-graph", "<model>",
                        f"an fp16 build for TensorRT {v} (strongly typed) takes its precision from the ONNX, which "
                        "has no float16 tensors; convert the ONNX to fp16 first")


def lint_onnx(
    path_or_model: str | os.PathLike[str] | Any,
    *,
    tensorrt_version: str = "10.3",
    strongly_typed: bool | None = None,
    precision: str | None = None,
) -> list[Violation]:
    """Every TensorRT rule the ONNX model breaks for ``tensorrt_version`` (empty when the parser will take it).

    ``precision`` ("fp32", "fp16", "int8"), when given, also checks that the
    ONNX carries that precision itself where the build is strongly typed
    (TensorRT 11 always; 10.x with ``strongly_typed=True``).
    """
    version = parse_version(tensorrt_version)
    typed = is_strongly_typed(version, strongly_typed)
    g = _Graph(_prepare(_load(path_or_model)))
    out: list[Violation] = []
    for rule in (
        _check_opset(g, version), _check_static_shapes(g), _check_rank(g), _check_ops(g, version),
        _check_qdq(g, version), _check_precision(g, version, typed, precision),
    ):
        out.extend(rule)
    return out


def check_onnx(
    path_or_model: str | os.PathLike[str] | Any,
    *,
    tensorrt_version: str = "10.3",
    strongly_typed: bool | None = None,
    precision: str | None = None,
    shown: int = 3,
) -> None:
    """Raise ExportError (one line, the first ``shown`` violations) when the model breaks a TensorRT rule."""
    violations = lint_onnx(path_or_model, tensorrt_version=tensorrt_version, strongly_typed=strongly_typed,
                           precision=precision)
    if violations:
        what = Path(path_or_model).name if isinstance(path_or_model, (str, os.PathLike)) else "the ONNX model"
        more = f" (+{len(violations) - shown} more)" if len(violations) > shown else ""
        raise ExportError(
            f"{what} breaks {len(violations)} TensorRT {tensorrt_version} rule(s): "
            + "; ".join(str(v) for v in violations[:shown]) + more,
            "fix the export (or quantization) for this TensorRT release; run lint_onnx for the full list",
        )
