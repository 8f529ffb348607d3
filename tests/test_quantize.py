"""Calibration ranges, the TensorRT-style Q/DQ graph, fp16 ONNX and the Q/DQ side of the precision search."""

from __future__ import annotations

import numpy as np
import pytest
from exporting import export_checked

from sfedge.backends.onnxruntime.make import ort_scorer
from sfedge.errors import ConfigError, UnknownNameError
from sfedge.onnx_metadata import read_onnx_metadata
from sfedge.quantize.mixed import QdqSearch, onnx_layer_macs
from sfedge.quantize.qdq import quantizable_layers, quantize_qdq, to_fp16
from sfedge.quantize.ranges import compute_ranges, entropy_threshold, read_ranges

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def sfconv_onnx(demo_sources, fundus_calibration, tmp_path_factory):
    """The trained SFConv demo U-Net exported once."""
    folder = tmp_path_factory.mktemp("quantize")
    return export_checked(demo_sources["unet-sfconv"], folder / "unet-sfconv.onnx", check_inputs=fundus_calibration.holdout)


@pytest.fixture(scope="module")
def ranges(sfconv_onnx, fundus_calibration):
    return {m: compute_ranges(sfconv_onnx.path, fundus_calibration, m) for m in ("minmax", "entropy")}


@pytest.fixture(scope="module")
def qdq(sfconv_onnx, fundus_calibration, ranges, demo_sources):
    """Every layer int8 with entropy ranges, parity measured on the held-out split."""
    ref = demo_sources["unet-sfconv"].reference(fundus_calibration.holdout)
    return quantize_qdq(sfconv_onnx, fundus_calibration, sfconv_onnx.path.with_name("int8.onnx"),
                        ranges=ranges["entropy"], reference=ref, score=ort_scorer())


def _graph(path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return model, inits, producer, consumers


def test_ranges_cover_every_activation_tensor(sfconv_onnx, ranges) -> None:
    model = onnx.load(str(sfconv_onnx.path))
    inits = {t.name for t in model.graph.initializer}
    activations = {t for n in model.graph.node for t in [*n.input, *n.output] if t and t not in inits}
    for r in ranges.values():
        assert set(r) == activations  # keyed by this file's tensor names, input and output included
        assert all(np.isfinite(v) and v >= 0 for v in r.values())


def test_entropy_ranges_differ_from_minmax(ranges) -> None:
    mm, ent = ranges["minmax"], ranges["entropy"]
    # Entropy clips outliers: never wider than min/max, and clearly narrower for many tensors.
    assert all(ent[k] <= mm[k] * (1 + 1e-6) for k in mm)
    narrower = [k for k in mm if ent[k] < 0.95 * mm[k]]
    assert len(narrower) >= len(mm) // 4, f"only {len(narrower)} of {len(mm)} tensors clipped"


def test_entropy_threshold_is_onnxruntimes(sfconv_onnx, fundus_calibration) -> None:
    """The fast threshold search returns exactly what ONNX Runtime's own (slow) search returns."""
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from sfedge.quantize.ranges import ENTROPY_OPTIONS

    cal = create_calibrator(Path(sfconv_onnx.path), None, augmented_model_path=str(sfconv_onnx.path.with_name("aug.onnx")),
                            calibrate_method=CalibrationMethod.Entropy, extra_options=dict(ENTROPY_OPTIONS))
    cal.collect_data(fundus_calibration.onnx_reader("input", "calibration", 0, 4))
    hists = cal.collector.histogram_dict
    for name in sorted(hists)[:2] + ["output"]:
        ours = entropy_threshold(hists[name], 128)
        theirs = cal.collector.get_entropy_threshold(hists[name], 128)
        assert (float(ours[0]), float(ours[1])) == (float(theirs[0]), float(theirs[1]))
    sfconv_onnx.path.with_name("aug.onnx").unlink()


def test_unknown_method_is_refused(sfconv_onnx, fundus_calibration) -> None:
    with pytest.raises(UnknownNameError, match="valid calibration methods: entropy, minmax, percentile"):
        compute_ranges(sfconv_onnx.path, fundus_calibration, "kl")


def test_qdq_weights_are_int8_symmetric_per_channel(qdq) -> None:
    model, inits, producer, consumers = _graph(qdq.path)
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(layers) == qdq.meta["layers"] and not qdq.float_layers
    for node in layers:
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale, zp = (inits[i] for i in dq.input)
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        out_axis = 0  # Conv: output channels; ConvTranspose (Ci, Co, kh, kw): axis 0, the only one TensorRT supports
        assert w.dtype == np.int8 and zp.dtype == np.int8 and not zp.any()
        assert axis == out_axis and scale.shape == zp.shape == (w.shape[out_axis],)
        assert np.abs(w).max() <= 127
        if len(node.input) > 2:  # bias stays float, straight from an initializer
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32


def test_qdq_activations_are_per_tensor_symmetric_from_the_ranges(qdq, ranges) -> None:
    model, inits, producer, consumers = _graph(qdq.path)
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quants
    for q in quants:
        scale, zp = inits[q.input[1]], inits[q.input[2]]
        assert scale.shape == () and zp.shape == () and zp.dtype == np.int8 and zp == 0
        assert scale == pytest.approx(ranges["entropy"][q.input[0]] / 127, rel=1e-6)
        # Q/DQ sits only in front of the weighted layers' data inputs (TensorRT's placement).
        for dq in consumers[q.output[0]]:
            assert dq.op_type == "DequantizeLinear"
            for user in consumers[dq.output[0]]:
                assert user.op_type in ("Conv", "ConvTranspose") and user.input[0] == dq.output[0]
    # The rank-r bottleneck (output of each 1xk conv) is quantized as the kx1 conv's input.
    conv_a = [n for n in model.graph.node if n.op_type == "Conv" and "/conv_a/" in n.name]
    assert conv_a and all(consumers[n.output[0]][0].op_type == "QuantizeLinear" for n in conv_a)


def test_qdq_metadata_and_ranges_file(qdq, ranges) -> None:
    meta = read_onnx_metadata(qdq.path)
    assert meta["precision"] == "int8" and meta["calibration"] == "entropy" and meta["float_layers"] == []
    assert meta["model"] == "unet-sfconv"  # the export's metadata is kept
    (ranges_file,) = qdq.files
    assert ranges_file.name == qdq.meta["ranges_file"]
    assert read_ranges(ranges_file) == (ranges["entropy"], "entropy")


def test_float_nodes_stay_float(sfconv_onnx, fundus_calibration, ranges, tmp_path) -> None:
    layers = quantizable_layers(sfconv_onnx.path)
    keep = [layers[0], next(n for n in layers if "/conv_b/" in n)]
    art = quantize_qdq(sfconv_onnx, fundus_calibration, tmp_path / "mixed.onnx", ranges=ranges["minmax"],
                       float_nodes=keep, method="minmax")
    model, inits, producer, _ = _graph(art.path)
    by_name = {n.name: n for n in model.graph.node}
    for name in layers:
        node = by_name[name]
        quantized = node.input[0] in producer and producer[node.input[0]].op_type == "DequantizeLinear"
        assert quantized == (name not in keep), name
        assert (node.input[1] in inits and inits[node.input[1]].dtype == np.float32) == (name in keep)
    assert art.float_layers == keep and read_onnx_metadata(art.path)["float_layers"] == keep
    with pytest.raises(ConfigError, match="not quantizable layers"):
        quantize_qdq(sfconv_onnx, fundus_calibration, tmp_path / "bad.onnx", ranges=ranges["minmax"],
                     float_nodes=["/no/such/Conv"])
    assert not (tmp_path / "bad.onnx").exists()


def test_int8_runs_in_onnxruntime_close_to_torch(qdq) -> None:
    p = qdq.parity
    assert p.samples == 16 and np.isfinite(p.max_abs)
    # Close, but not fp32-close.  Every layer in int8 with no float fallback: the SFConv demo model's mask agreement
    # was 0.89-0.93 across trainings of the demo model (training is not bit-reproducible across machines).
    assert p.cosine > 0.99 and p.dice_agreement > 0.85
    assert p.max_abs > 1e-3  # really quantized


def test_qdq_search_adapter_probes_one_layer_on_calibration_samples(sfconv_onnx, fundus_calibration, ranges,
                                                                     demo_sources, qdq, tmp_path) -> None:
    """The Q/DQ adapter: a probe quantizes one layer alone and is scored on calibration samples, not the held-out ones."""
    src = demo_sources["unet-sfconv"]
    probe_ref = src.reference(fundus_calibration.calibration[:4])
    adapter = QdqSearch(sfconv_onnx, fundus_calibration, tmp_path / "cand.onnx", ranges["entropy"], "entropy",
                        ort_scorer(), src.reference(fundus_calibration.holdout), probe_ref, tmp_path)
    layers = adapter.layers()
    assert [layer.name for layer in layers] == quantizable_layers(sfconv_onnx.path)
    assert {layer.role for layer in layers} <= {"sfconv 1xk (to rank r)", "sfconv kx1 (rank-r input)", "dense conv",
                                                "up (transposed conv)", "head (1x1)"}
    one = adapter.probe(layers[0].name)
    assert one.samples == 4 and one.mean_abs > 0
    assert one.mean_abs < qdq.parity.mean_abs  # one layer in int8 hurts less than all of them
    # Costs are MACs from the graph's shapes: every layer has some, and they add up to the model's conv MACs.
    assert all(adapter.cost(layer.name) > 0 for layer in layers)
    every = adapter.build([])
    assert every.samples == len(fundus_calibration.holdout) and (tmp_path / "cand.onnx").is_file()


def test_onnx_layer_macs_counts_conv_and_transposed_conv() -> None:
    """MACs per node from ONNX shapes: Co*H*W outputs x Ci*k*k for a conv; Ci*H*W inputs x Co*k*k for a transposed conv."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.zeros((8, 4, 3, 3), np.float32), "w")
    wt = numpy_helper.from_array(np.zeros((8, 2, 2, 2), np.float32), "wt")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["y", "wt"], ["z"], name="up", strides=[2, 2])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 32, 32])], [w, wt])
    macs = onnx_layer_macs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert macs == {"conv": 8 * 16 * 16 * 4 * 3 * 3, "up": 8 * 16 * 16 * 2 * 2 * 2}


def test_fp16_keeps_float32_io_and_runs(sfconv_onnx, fundus_calibration, demo_sources, tmp_path) -> None:
    art = to_fp16(sfconv_onnx, tmp_path / "fp16.onnx")
    model = onnx.load(str(art.path))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]] == [f32, f32]
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == f16 for t in weights)
    ref = demo_sources["unet-sfconv"].reference(fundus_calibration.holdout)
    p = ort_scorer()(art.path, fundus_calibration.holdout, ref)
    assert p.cosine > 0.999 and p.dice_agreement > 0.99 and p.max_abs > 1e-5  # fp16, not fp32
    assert read_onnx_metadata(art.path)["precision"] == "fp16"


def test_nmf_stays_float32_in_fp16_and_int8(tmp_path) -> None:
    """The Factorizer's NMF (eps 1e-8, all-zero windows) is never fp16 and never int8."""
    from test_factorizer import _perturbed

    from sfedge.calibration import load_calibration
    from sfedge.source import ModelSource

    model = _perturbed("factorizer", widths=[16, 32], input_size=[32, 32])
    src = ModelSource(model, "factorizer", model.sfedge_config, "perturbed", (1, 3, 32, 32))
    calib = load_calibration("fundus-demo", (32, 32))
    fp32 = export_checked(src, tmp_path / "f.onnx", check_inputs=calib.holdout)
    ref = src.reference(calib.holdout)

    art = to_fp16(fp32, tmp_path / "f16.onnx")
    assert art.float_layers and all("/nmf/" in n for n in art.float_layers)
    model16 = onnx.shape_inference.infer_shapes(onnx.load(str(art.path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model16.graph.value_info, *model16.graph.input]}
    nmf_nodes = [n for n in model16.graph.node if n.name in art.float_layers and n.op_type in ("MatMul", "Div", "Add")]
    assert nmf_nodes
    for node in nmf_nodes:
        assert all(types.get(i) == onnx.TensorProto.FLOAT for i in node.input if i in types), node.name
    p16 = ort_scorer()(art.path, calib.holdout, ref)
    assert np.isfinite(p16.max_abs) and p16.cosine > 0.999

    assert not any("/nmf/" in n for n in quantizable_layers(fp32.path))
    q = quantize_qdq(fp32, calib, tmp_path / "int8.onnx", method="minmax", reference=ref, score=ort_scorer())
    graph = onnx.load(str(q.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if "/nmf/" in node.name:
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    assert np.isfinite(q.parity.max_abs) and q.parity.cosine > 0.99
