"""Calibration ranges, the TensorRT-style Q/DQ graph, fp16 ONNX and per-layer sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from sfedge.errors import ConfigError, UnknownNameError
from sfedge.export import export_onnx, read_onnx_metadata
from sfedge.quantize.qdq import measure_onnx_parity, quantizable_layers, quantize_qdq, to_fp16
from sfedge.quantize.ranges import compute_ranges, entropy_threshold, read_ranges
from sfedge.quantize.sensitivity import layer_sensitivity

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def sfconv_onnx(demo_sources, fundus_calibration, tmp_path_factory):
    """The trained SFConv demo U-Net exported once."""
    folder = tmp_path_factory.mktemp("quantize")
    return export_onnx(demo_sources["unet-sfconv"], folder / "unet-sfconv.onnx", check_inputs=fundus_calibration.holdout)


@pytest.fixture(scope="module")
def ranges(sfconv_onnx, fundus_calibration):
    return {m: compute_ranges(sfconv_onnx.path, fundus_calibration, m) for m in ("minmax", "entropy")}


@pytest.fixture(scope="module")
def qdq(sfconv_onnx, fundus_calibration, ranges, demo_sources):
    """Every layer int8 with entropy ranges, parity measured on the held-out split."""
    ref = demo_sources["unet-sfconv"].reference(fundus_calibration.holdout)
    return quantize_qdq(sfconv_onnx, fundus_calibration, sfconv_onnx.path.with_name("int8.onnx"),
                        ranges=ranges["entropy"], reference=ref)


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
    assert p["samples"] == 16 and np.isfinite(p["max_abs"])
    assert p["cosine"] > 0.99 and p["dice_agreement"] > 0.9  # close, but not fp32-close
    assert p["max_abs"] > 1e-3  # really quantized


def test_sensitivity_ranks_every_layer(sfconv_onnx, fundus_calibration, ranges, demo_sources, qdq) -> None:
    ref = demo_sources["unet-sfconv"].reference(fundus_calibration.holdout)
    layers = quantizable_layers(sfconv_onnx.path)
    pick = [layers[0], layers[len(layers) // 2], layers[-1]]
    table = layer_sensitivity(sfconv_onnx, fundus_calibration, ref, ranges=ranges["entropy"], layers=pick, samples=4)
    assert sorted(s.layer for s in table) == sorted(pick)
    assert [s.score for s in table] == sorted((s.score for s in table), reverse=True)
    assert all(s.samples == 4 and s.mean_abs > 0 for s in table)
    # One layer in int8 hurts less than all of them.
    assert table[0].mean_abs < qdq.parity["mean_abs"]
    assert {s.role for s in table} <= {"sfconv 1xk (to rank r)", "sfconv kx1 (rank-r input)", "dense conv",
                                       "up (transposed conv)", "head (1x1)"}


def test_fp16_keeps_float32_io_and_runs(sfconv_onnx, fundus_calibration, demo_sources, tmp_path) -> None:
    art = to_fp16(sfconv_onnx, tmp_path / "fp16.onnx")
    model = onnx.load(str(art.path))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]] == [f32, f32]
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == f16 for t in weights)
    ref = demo_sources["unet-sfconv"].reference(fundus_calibration.holdout)
    p = measure_onnx_parity(art.path, fundus_calibration.holdout, ref)
    assert p.cosine > 0.999 and p.dice_agreement > 0.99 and p.max_abs > 1e-5  # fp16, not fp32
    assert read_onnx_metadata(art.path)["precision"] == "fp16"


def test_nmf_stays_float32_in_fp16_and_int8(tmp_path) -> None:
    """The Factorizer's NMF (eps 1e-8, all-zero windows) is never fp16 and never int8."""
    from test_factorizer import _perturbed

    from sfedge.backends.base import ModelSource
    from sfedge.calibration import load_calibration

    model = _perturbed("factorizer", widths=[16, 32], input_size=[32, 32])
    src = ModelSource(model, "factorizer", model.sfedge_config, "perturbed", (1, 3, 32, 32))
    calib = load_calibration("fundus-demo", (32, 32))
    fp32 = export_onnx(src, tmp_path / "f.onnx", check_inputs=calib.holdout)
    ref = src.reference(calib.holdout)

    art = to_fp16(fp32, tmp_path / "f16.onnx")
    assert art.float_layers and all("/nmf/" in n for n in art.float_layers)
    model16 = onnx.shape_inference.infer_shapes(onnx.load(str(art.path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model16.graph.value_info, *model16.graph.input]}
    nmf_nodes = [n for n in model16.graph.node if n.name in art.float_layers and n.op_type in ("MatMul", "Div", "Add")]
    assert nmf_nodes
    for node in nmf_nodes:
        assert all(types.get(i) == onnx.TensorProto.FLOAT for i in node.input if i in types), node.name
    p16 = measure_onnx_parity(art.path, calib.holdout, ref)
    assert np.isfinite(p16.max_abs) and p16.cosine > 0.999

    assert not any("/nmf/" in n for n in quantizable_layers(fp32.path))
    q = quantize_qdq(fp32, calib, tmp_path / "int8.onnx", method="minmax", reference=ref)
    graph = onnx.load(str(q.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if "/nmf/" in node.name:
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    assert np.isfinite(q.parity["max_abs"]) and q.parity["cosine"] > 0.99
