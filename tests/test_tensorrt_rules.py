"""The TensorRT rules lint: clean exports pass, and each rule fires, by node name, when a violation is planted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sfedge.backends.tensorrt.rules import check_onnx, lint_onnx, supported_ops
from sfedge.errors import ConfigError, ExportError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

VERSIONS = ("8.5.2", "10.3", "11.0")


@pytest.fixture(scope="module")
def small_calibration(fundus_calibration):
    """Real fundus crops, centre 64x64 of the 256x256 set: the same images, a fraction of the compute."""
    return dataclasses.replace(fundus_calibration, calibration=fundus_calibration.calibration[:8, :, 96:160, 96:160],
                               holdout=fundus_calibration.holdout[:4, :, 96:160, 96:160])


@pytest.fixture(scope="module")
def unet_onnx(demo_checkpoints, small_calibration, tmp_path_factory):
    """The trained demo U-Net exported the way the TensorRT stage exports it (opset 17, static 64x64)."""
    from exporting import export_checked

    from sfedge.checkpoint import load_checkpoint
    from sfedge.source import ModelSource

    source = ModelSource.from_checkpoint(load_checkpoint(demo_checkpoints["unet"]), (64, 64))
    path = tmp_path_factory.mktemp("rules") / "unet.onnx"
    return export_checked(source, path, check_inputs=small_calibration.holdout)


def _rules(violations) -> set[str]:
    return {v.rule for v in violations}


# -- hand-made graphs for planted violations ---------------------------------------------------------------------
def _model(nodes, inits=(), inp=("x", [1, 3, 8, 8]), out=("y", None), opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, inp[1])],
        [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])], initializer=list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _conv_model(opset=17):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["c"], ["y"], name="relu")], [_init("w", w)], opset=opset)


def _qdq_conv(weight_axis=0, zero_point=0, zp_dtype=np.int8, act_scale=(0.05,), op="Conv", block_size=None):
    """x -> Q/DQ (activation) -> Conv/ConvTranspose with a DQ(int8 weight) -> y."""
    rng = np.random.default_rng(0)
    shape = (4, 3, 3, 3) if op == "Conv" else (3, 4, 2, 2)  # ConvTranspose weight is (C_in, C_out, kh, kw)
    channels = shape[weight_axis]
    wq = rng.integers(-127, 128, size=shape).astype(np.int8)
    extra = {"block_size": block_size} if block_size else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_act"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_act"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_weight", axis=weight_axis, **extra),
        helper.make_node(op, ["xd", "wd"], ["y"], name="layer"),
    ]
    inits = [
        _init("xs", np.array(act_scale, np.float32).reshape(-1) if len(act_scale) > 1 else np.float32(act_scale[0])),
        _init("xz", np.full(len(act_scale), zero_point, zp_dtype) if len(act_scale) > 1 else zp_dtype(zero_point)),
        _init("wq", wq), _init("ws", np.full(channels, 0.01, np.float32)), _init("wz", np.zeros(channels, np.int8)),
    ]
    return _model(nodes, inits, opset=21 if block_size else 17)


# -- clean exports pass -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_the_trained_unet_export_passes_every_release(unet_onnx, version) -> None:
    assert lint_onnx(unet_onnx.path, tensorrt_version=version) == []
    check_onnx(unet_onnx.path, tensorrt_version=version)  # does not raise


def test_symmetric_per_channel_qdq_with_axis0_deconv_weights_passes(unet_onnx, tmp_path) -> None:
    """onnxruntime's quantizer, with ConvTranspose weights overridden to axis 0, gives a lint-clean Q/DQ U-Net."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(unet_onnx.path))
    deconv_weights = [n.input[1] for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert deconv_weights  # the U-Net upsamples with transposed convs

    def quantize(path, extra):
        class Reader:
            def __init__(self):
                self.it = iter([{"input": np.random.default_rng(i).standard_normal((1, 3, 64, 64), np.float32)}
                                for i in range(2)])

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(unet_onnx.path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       **extra})
        return lint_onnx(path, tensorrt_version="10.3", precision="int8")

    default = quantize(tmp_path / "default.onnx", {})
    assert _rules(default) == {"qdq-weight-axis"}  # onnxruntime puts ConvTranspose weights on axis 1
    assert len(default) == len(deconv_weights)
    assert all(v.node.endswith("ConvTranspose") for v in default)
    fixed = quantize(tmp_path / "axis0.onnx", {"TensorQuantOverrides": {w: [{"axis": 0}] for w in deconv_weights},
                                              "QDQDisableWeightAdjustForInt32Bias": True})
    assert fixed == []


def test_sfedge_qdq_output_passes_the_lint(unet_onnx, small_calibration) -> None:
    from sfedge.quantize.qdq import quantize_qdq

    qdq = quantize_qdq(unet_onnx, small_calibration, unet_onnx.path.with_name("sfedge-qdq.onnx"), method="minmax",
                       write_ranges_file=False)
    assert lint_onnx(qdq.path, tensorrt_version="10.3", precision="int8") == []


# -- each rule fires on a planted violation, naming the node ------------------------------------------------------
def test_opset_outside_the_parser_range() -> None:
    model = _conv_model(opset=18)
    assert _rules(lint_onnx(model, tensorrt_version="8.5.2")) == {"opset"}  # 8.5 tops out at 17
    assert lint_onnx(model, tensorrt_version="10.3") == []


def test_dynamic_input_shape_is_named() -> None:
    model = _conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    violations = lint_onnx(model, tensorrt_version="10.3")
    assert _rules(violations) == {"static-shape"}
    assert "x" in {v.node for v in violations}  # the dynamic output that follows from it may be named too


def test_rank_above_eight_is_named_by_its_node() -> None:
    shape = np.array([1, 1, 1, 1, 1, 1, 3, 8, 8], np.int64)  # rank 9
    model = _model([helper.make_node("Reshape", ["x", "s"], ["deep"], name="make_rank9"),
                    helper.make_node("Reshape", ["deep", "back"], ["y"], name="back")],
                   [_init("s", shape), _init("back", np.array([1, 3, 8, 8], np.int64))])
    violations = lint_onnx(model, tensorrt_version="10.3")
    assert [(v.rule, v.node) for v in violations] == [("rank", "make_rank9")]


def test_unsupported_ops_depend_on_the_release() -> None:
    norm = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln", axis=-1)],
                  [_init("g", np.ones(8, np.float32))])
    (v,) = lint_onnx(norm, tensorrt_version="8.5.2")  # added in 8.6
    assert (v.rule, v.node) == ("unsupported-op", "ln")
    assert lint_onnx(norm, tensorrt_version="10.3") == []
    assert "LayerNormalization" in supported_ops("10.3") and "LayerNormalization" not in supported_ops("8.5.2")
    custom = _model([helper.make_node("FusedConv", ["x"], ["y"], name="ort_fused", domain="com.microsoft")])
    for version in VERSIONS:
        assert [(v.rule, v.node) for v in lint_onnx(custom, tensorrt_version=version)] == [
            ("unsupported-op", "ort_fused")]


def test_op_restrictions() -> None:
    scales = _init("scales", np.array([1, 1, 2, 2], np.float32))
    cubic = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")], [scales])
    assert [(v.rule, v.node) for v in lint_onnx(cubic, tensorrt_version="10.3")] == [("op-restriction", "up")]
    linear = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="linear")], [scales])
    assert lint_onnx(linear, tensorrt_version="10.3") == []
    einsum = _model([helper.make_node("Einsum", ["x"], ["y"], name="ell", equation="...ij->...ji")])
    assert _rules(lint_onnx(einsum, tensorrt_version="8.5.2")) == {"op-restriction"}
    assert lint_onnx(einsum, tensorrt_version="10.3") == []


def test_clean_qdq_graph_passes() -> None:
    for version in VERSIONS:
        assert lint_onnx(_qdq_conv(), tensorrt_version=version, precision="int8") == []


@pytest.mark.parametrize("planted, rule, node", [
    (dict(zero_point=3), "qdq-zero-point", "q_act"),
    (dict(zp_dtype=np.uint8, zero_point=0), "qdq-type", "q_act"),
    (dict(weight_axis=1), "qdq-weight-axis", "layer"),
    (dict(op="ConvTranspose", weight_axis=1), "qdq-weight-axis", "layer"),
    (dict(act_scale=(0.05, 0.05, 0.05)), "qdq-activation", "q_act"),
    (dict(block_size=3), "qdq-block", "dq_weight"),
])
def test_qdq_rules(planted, rule, node) -> None:
    violations = lint_onnx(_qdq_conv(**planted), tensorrt_version="10.3")
    assert rule in _rules(violations)
    assert node in {v.node for v in violations if v.rule == rule}


def test_deconv_weights_on_axis0_pass() -> None:
    assert lint_onnx(_qdq_conv(op="ConvTranspose", weight_axis=0), tensorrt_version="10.3") == []


def test_negative_scale_is_caught() -> None:
    model = _qdq_conv()
    for init in model.graph.initializer:
        if init.name == "xs":
            init.CopyFrom(_init("xs", np.float32(-0.05)))
    assert "qdq-scale" in _rules(lint_onnx(model, tensorrt_version="10.3"))


def test_strongly_typed_builds_need_precision_in_the_graph(unet_onnx, tmp_path) -> None:
    from sfedge.quantize.qdq import to_fp16

    # TensorRT 11 (always strongly typed) has no implicit INT8 and no fp16 flag.
    assert _rules(lint_onnx(unet_onnx.path, tensorrt_version="11.0", precision="int8")) == {"implicit-int8"}
    assert _rules(lint_onnx(unet_onnx.path, tensorrt_version="11.0", precision="fp16")) == {"fp16-in-graph"}
    assert _rules(lint_onnx(unet_onnx.path, tensorrt_version="10.3", strongly_typed=True, precision="fp16")) == {
        "fp16-in-graph"}
    # Weakly typed 10.x builds take precision from builder flags and the calibration cache.
    assert lint_onnx(unet_onnx.path, tensorrt_version="10.3", precision="int8") == []
    half = to_fp16(unet_onnx, tmp_path / "half.onnx")
    assert lint_onnx(half.path, tensorrt_version="11.0", precision="fp16") == []
    with pytest.raises(ConfigError, match="8.5 has no strongly typed"):
        lint_onnx(unet_onnx.path, tensorrt_version="8.5.2", strongly_typed=True)


def test_check_onnx_is_one_line_naming_the_node(tmp_path) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(_qdq_conv(zero_point=3), str(path))
    with pytest.raises(ExportError) as err:
        check_onnx(path, tensorrt_version="10.3")
    message = str(err.value)
    assert "\n" not in message and "bad.onnx" in message and "q_act" in message and "qdq-zero-point" in message
