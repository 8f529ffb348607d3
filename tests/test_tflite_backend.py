"""TFLite backend: parity of every precision with torch (trained demo U-Nets, Factorizer), int8 I/O, layouts.

Artifacts are built once per session (conversion takes seconds per model) by
the ``built`` fixture and shared by the tests below.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

import torch  # noqa: E402

from sfedge.artifact import from_artifact_tensor, to_artifact_tensor  # noqa: E402
from sfedge.backends.registry import runner_class, runner_for  # noqa: E402
from sfedge.backends.tflite.convert import tflite_layout  # noqa: E402
from sfedge.backends.tflite.make import float_tflite, make  # noqa: E402
from sfedge.backends.tflite.ops import op_report  # noqa: E402
from sfedge.backends.tflite.quantize import build_recipe, calibrate, write_quantized  # noqa: E402
from sfedge.backends.tflite.runner import TFLiteRunner  # noqa: E402
from sfedge.errors import ConfigError, ParityError  # noqa: E402
from sfedge.parity import compare_outputs  # noqa: E402
from sfedge.source import ModelSource  # noqa: E402
from sfedge.targets import load_target  # noqa: E402

DEMOS = ["unet", "unet-sfconv"]


@pytest.fixture(scope="session")
def tflite_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="session")
def built(demo_sources, fundus_calibration, host_target, tflite_dir):
    """build(model, precision) -> Artifact, each built at most once per session."""
    cache: dict = {}

    def build(name: str, precision: str):
        if (name, precision) not in cache:
            cache[name, precision] = make(demo_sources[name], host_target, precision, fundus_calibration, tflite_dir)
        return cache[name, precision]

    return build


def _target(tmp_path: Path, name: str, body: str):
    f = tmp_path / f"{name}.toml"
    f.write_text(f'name = "{name}"\n{body}')
    return load_target(f)


def _perturbed_factorizer() -> torch.nn.Module:
    """The Factorizer at its fixed 128x128 input with seeded noise on every parameter (non-trivial outputs)."""
    from sfedge.models import create_model

    model = create_model("factorizer").eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def factorizer_source() -> ModelSource:
    from sfedge.checkpoint import weights_sha256

    model = _perturbed_factorizer()
    return ModelSource(model, "factorizer", dict(model.sfedge_config), weights_sha256(model.state_dict()), (1, 3, 128, 128))


@pytest.fixture(scope="session")
def fundus_128():
    """fundus-demo crops at the Factorizer's 128x128, fewer of them (its calibration interpreter is slow)."""
    from sfedge.calibration import CalibrationSpec, load_calibration
    from sfedge.preprocess import FUNDUS_PREPROCESSING

    spec = CalibrationSpec("fundus-demo", "built-in, small", {"builtin": "fundus-demo"}, FUNDUS_PREPROCESSING,
                           count=8, holdout=8)
    return load_calibration(spec, (128, 128))


def _independent_parity(artifact, source: ModelSource, calib) -> object:
    """Parity measured again with a fresh runner from the registry (not the numbers make() stored)."""
    with runner_for(artifact.path, threads=2) as runner:
        return compare_outputs(source.reference(calib.holdout), runner.run(calib.holdout))


@pytest.mark.parametrize("name", DEMOS)
def test_fp32_matches_torch(built, demo_sources, fundus_calibration, host_target, name: str) -> None:
    art = built(name, "fp32")
    assert (art.backend, art.kind, art.precision) == ("tflite", "tflite", "fp32")
    parity = _independent_parity(art, demo_sources[name], fundus_calibration)
    assert parity.relative_max_abs <= host_target.tolerance("fp32").relative_max_abs
    assert parity.reference_range > 1.0  # a trained model: errors are judged against a real output range
    assert parity.dice_agreement > 0.999
    assert art.parity.max_abs == pytest.approx(parity.max_abs, rel=1e-3, abs=1e-7)
    assert art.inputs[0].layout == "NHWC" and art.inputs[0].shape == [1, 256, 256, 3]
    assert art.outputs[0].shape == [1, 256, 256, 1]
    assert Path(art.files[0]).name.endswith(".ops.json") and Path(art.files[0]).is_file()
    # NHWC I/O with no layout change anywhere: litert-torch moved it into the producers and consumers.
    report = op_report(art.path)
    assert report.transposes == 0 and art.meta["op_report"]["transpose_at_io"] is False
    assert report.fully_delegated


@pytest.mark.tier2
def test_factorizer_fp32_matches_torch_and_nmf_is_float(factorizer_source, fundus_128, host_target, tflite_dir) -> None:
    art = make(factorizer_source, host_target, "fp32", fundus_128, tflite_dir)
    parity = _independent_parity(art, factorizer_source, fundus_128)
    assert parity.reference_range > 0.5
    assert parity.relative_max_abs <= host_target.tolerance("fp32").relative_max_abs
    assert art.inputs[0].shape == [1, 128, 128, 3]
    # Every NMF layer is listed as float and the notes say quantization goes around them.
    nmfs = [n for n, m in factorizer_source.model.named_modules() if type(m).__name__ == "NMF"]
    assert sorted(art.float_layers) == sorted(nmfs)
    assert any("NMF" in n for n in art.notes)
    report = op_report(art.path)
    assert report.transposes > 0 and not report.transpose_at_input and not report.transpose_at_output


@pytest.mark.tier2
def test_factorizer_int8_keeps_nmf_float(factorizer_source, fundus_128, tmp_path, tflite_dir) -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    loose = _target(tmp_path, "loose", 'backend = "tflite"\nprecisions = ["fp32", "int8"]\ninput_size = [128, 128]\n'
                    "[tolerances.int8]\ncosine = 0.5\n")
    art = make(factorizer_source, loose, "int8", fundus_128, tflite_dir, max_float_fraction=0.0)
    interp = Interpreter(str(art.path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops = interp._get_ops_details()

    def out_name(op: dict) -> str:
        return interp._get_tensor_details(op["outputs"][0], 0)["name"]

    movers = ("RESHAPE", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE")
    nmf_math = [op for op in ops if "sfedge.nn.nmf.NMF_" in out_name(op) and op["op_name"] not in movers]
    assert {op["op_name"] for op in nmf_math} >= {"BATCH_MATMUL", "DIV"}
    assert all(np.dtype(t).name == "float32" for op in nmf_math for t in op["result_types"])
    # Quantized around the NMF: int8 convs elsewhere, a DEQUANTIZE into each NMF layer.
    assert any(op["op_name"] == "CONV_2D" and np.dtype(op["result_types"][0]).name == "int8" for op in ops)
    assert sum(op["op_name"] == "DEQUANTIZE" for op in ops) >= len(art.float_layers)
    assert art.inputs[0].dtype == "int8"
    assert any("NMF" in n for n in art.notes)


@pytest.mark.parametrize("name", DEMOS)
def test_int8_meets_target_on_trained_demo(built, demo_sources, fundus_calibration, host_target, name: str) -> None:
    art = built(name, "int8")
    tol = host_target.tolerance("int8")
    parity = _independent_parity(art, demo_sources[name], fundus_calibration)
    assert not tol.failures(parity), parity
    if art.outputs[0].dtype == "int8":  # full-integer I/O met the gate
        assert art.inputs[0].dtype == "int8" and art.outputs[0].scale is not None
    else:  # int8 I/O could not: float I/O, and the notes say why and what to do (--qat)
        assert art.inputs[0].dtype == "float32" and any("--qat" in n for n in art.notes), art.notes
    report = op_report(art.path)
    assert report.fully_delegated and not report.transpose_at_input and not report.transpose_at_output
    assert art.meta["recipe"] and Path(art.path.with_suffix(".recipe.json")).is_file()
    steps = art.meta["quantize"]["search"]["steps"]
    assert steps[0]["float_layers"] == 0 and steps[0]["added"] is None  # all layers quantized first
    if art.float_layers:  # mixed precision was needed: the notes say which layers, the steps how it got there
        assert any(", ".join(art.float_layers) in n for n in art.notes)
        assert steps[-1]["float_layers"] == len(art.float_layers)
        found = art.meta["quantize"]["search"]
        ranked = found["sensitivity"] if found.get("order", "gain per cost") == "gain per cost" else sorted(
            found["sensitivity"], key=lambda s: s["score"], reverse=True)
        ranking = [s["layer"] for s in ranked]
        assert art.float_layers == ranking[: len(art.float_layers)]


def test_fp16_halves_the_file_and_matches(built, demo_sources, fundus_calibration, host_target) -> None:
    fp32, fp16 = built("unet-sfconv", "fp32"), built("unet-sfconv", "fp16")
    assert fp16.path.stat().st_size < 0.6 * fp32.path.stat().st_size
    parity = _independent_parity(fp16, demo_sources["unet-sfconv"], fundus_calibration)
    assert not host_target.tolerance("fp16").failures(parity)
    assert op_report(fp16.path).ops.get("DEQUANTIZE", 0) > 0  # fp16 constants, dequantized at load
    # host-cpu has no fp16 arithmetic: no reduced-precision metadata, so every CPU computes the file in fp32.
    from sfedge.backends.tflite.fp16 import reduced_precision

    assert reduced_precision(fp16.path) is None and "computed in fp32" in " ".join(fp16.notes)


def test_int8_dynamic_builds_or_fails_loudly(demo_sources, fundus_calibration, host_target, tflite_dir) -> None:
    try:
        art = make(demo_sources["unet"], host_target, "int8-dynamic", fundus_calibration, tflite_dir)
    except ParityError as e:
        assert "int8-dynamic" in str(e)
        return
    assert art.inputs[0].dtype == "float32"
    assert not host_target.tolerance("int8-dynamic").failures(art.parity)


def test_int8_io_round_trips_through_scale_and_zero_point(demo_sources, fundus_calibration, tflite_dir) -> None:
    """A full-integer file: the runner's specs carry the file's own scale / zero point and prepare/finish use them."""
    from ai_edge_litert.interpreter import Interpreter

    src = demo_sources["unet"]
    fp32 = float_tflite(src, "NHWC", tflite_dir)
    qsvs = calibrate(fp32, fundus_calibration.tflite_samples("args_0", "NHWC"), "serving_default", build_recipe("int8"))
    path = write_quantized(fp32, tflite_dir / "full-int8.tflite", build_recipe("int8"), qsvs)
    detail = Interpreter(str(path)).get_signature_runner().get_input_details()["args_0"]
    scale, zero = detail["quantization_parameters"]["scales"][0], detail["quantization_parameters"]["zero_points"][0]
    x = fundus_calibration.holdout[:2]
    with TFLiteRunner(path, threads=2) as runner:
        spec, out_spec = runner.inputs[0], runner.outputs[0]
        assert (spec.dtype, spec.layout) == ("int8", "NHWC") and out_spec.dtype == "int8"
        assert spec.scale == pytest.approx(float(scale)) and spec.zero_point == int(zero)
        feed = runner.prepare(x[:1])[spec.name]
        expect = np.clip(np.round(x[:1].transpose(0, 2, 3, 1) / scale) + zero, -128, 127).astype(np.int8)
        np.testing.assert_array_equal(feed, expect)
        # Inside the calibrated range, int8 -> float returns the input to within half a step.
        back = from_artifact_tensor(to_artifact_tensor(x, spec), spec)
        inside = (x > (-128 - zero) * scale) & (x < (127 - zero) * scale)
        assert np.abs(back - x)[inside].max() <= scale / 2 + 1e-6
        raw = runner.infer(runner.prepare(x[:1]))[out_spec.name]
        assert raw.dtype == np.int8
        deq = runner.finish({out_spec.name: raw})
        np.testing.assert_allclose(deq, ((raw.astype(np.float32) - out_spec.zero_point) * out_spec.scale).transpose(0, 3, 1, 2))
        out = runner.run(x)
    parity = compare_outputs(src.reference(x), out)
    assert parity.cosine > 0.99 and parity.dice_agreement > 0.9


def test_layout_rule() -> None:
    assert tflite_layout(load_target("host-cpu")) == "NHWC"  # NCHW is for its primary backend, ONNX Runtime
    assert tflite_layout(load_target("android-arm64")) == "NHWC"


def test_nchw_target_gets_nchw_io(tmp_path, demo_sources, fundus_calibration) -> None:
    nchw = _target(tmp_path, "nchw-tflite", 'backend = "tflite"\nprecisions = ["fp32"]\nlayout = "NCHW"\ninput_size = [256, 256]\n')
    assert tflite_layout(nchw) == "NCHW"
    art = make(demo_sources["unet"], nchw, "fp32", fundus_calibration, tmp_path)
    assert art.inputs[0].layout == "NCHW" and art.inputs[0].shape == [1, 3, 256, 256]
    assert op_report(art.path).transpose_at_input  # the price of NCHW on TFLite, which the rule avoids by default


def test_parity_failure_raises_one_line_and_leaves_no_artifact(tmp_path, demo_sources, fundus_calibration,
                                                                tflite_dir) -> None:
    strict = _target(tmp_path, "strict", 'backend = "tflite"\nprecisions = ["int8"]\nlayout = "NHWC"\n'
                     'input_size = [256, 256]\n[tolerances.int8]\nmax_abs = 1e-6\n')
    out = tmp_path / "out"
    out.mkdir()
    cached = float_tflite(demo_sources["unet"], "NHWC", tflite_dir)  # the conversion cache is keyed by content
    (out / cached.name).write_bytes(cached.read_bytes())
    with pytest.raises(ParityError) as e:
        make(demo_sources["unet"], strict, "int8", fundus_calibration, out, max_float_fraction=0.0)
    assert "int8" in str(e.value) and "max abs" in str(e.value) and "\n" not in str(e.value)
    assert not list(out.glob("*-int8.tflite")) and not list(out.glob(".*.tflite"))


def test_registry_exposes_backend() -> None:
    from sfedge.backends.maker import maker

    assert runner_class("tflite") is TFLiteRunner and maker("tflite") is make


@pytest.fixture(scope="module")
def instance_norm_tflite(tmp_path_factory):
    """A small instance-normalized net as a float .tflite, with its input name and signature."""
    from sfedge.backends.tflite.convert import convert_float

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.InstanceNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 1, 1)).eval()
    path = tmp_path_factory.mktemp("instnorm") / "net-fp32.tflite"
    convert_float(model, (1, 3, 16, 16), "NHWC", path)
    with TFLiteRunner(path, threads=1, layout="NHWC") as r:
        name, signature = r.inputs[0].name, r.signature
    return model, path, name, signature


def _input_tensor(path: Path) -> str:
    from sfedge.backends.tflite.ops import read_ops

    return read_ops(path)[1]["input_names"][0]


def _scaled_samples(name: str, scales: list[float]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{name: (rng.standard_normal((1, 16, 16, 3)) * s).astype(np.float32)} for s in scales]


def test_range_methods_calibrate_what_they_say(instance_norm_tflite) -> None:
    """minmax keeps the extremes over every sample; the moving average lets a late wide sample count 5%."""
    _, path, name, signature = instance_norm_tflite
    samples = _scaled_samples(name, [1.0] * 11 + [10.0])
    recipe = build_recipe("int8")
    low = min(float(s[name].min()) for s in samples)
    high = max(float(s[name].max()) for s in samples)
    wide = calibrate(path, samples, signature, recipe, "minmax")[_input_tensor(path)]
    narrow = calibrate(path, samples, signature, recipe, "moving-average")[_input_tensor(path)]
    assert float(np.min(wide["min"])) == pytest.approx(low) and float(np.max(wide["max"])) == pytest.approx(high)
    assert float(np.max(narrow["max"])) < 0.5 * high
    with pytest.raises(ConfigError, match="range method"):
        calibrate(path, samples, signature, recipe, "entropy")


def test_choose_ranges_keeps_the_method_that_scores_better_on_the_probe(instance_norm_tflite, tmp_path) -> None:
    """Probe inputs as wide as the late calibration sample: clipping them (moving average) loses to minmax."""
    from sfedge.backends.tflite.make import tflite_scorer
    from sfedge.backends.tflite.quantize import choose_ranges

    model, path, name, signature = instance_norm_tflite
    samples = _scaled_samples(name, [1.0] * 11 + [10.0])
    probe_x = np.concatenate([s[name] for s in _scaled_samples(name, [10.0] * 4)]).transpose(0, 3, 1, 2).copy()
    with torch.no_grad():
        probe_y = model(torch.from_numpy(probe_x)).numpy()
    method, qsvs, tried = choose_ranges(path, samples, signature, build_recipe("int8"),
                                        tflite_scorer(1, "NHWC", task="regression"), (probe_x, probe_y))
    assert set(tried) == {"moving-average", "minmax"} and method == "minmax", tried
    assert tried["minmax"]["mean_abs"] < tried["moving-average"]["mean_abs"]
    assert float(np.max(qsvs[_input_tensor(path)]["max"])) > 20


def test_instance_norm_stays_float_in_full_integer_files(instance_norm_tflite, tmp_path) -> None:
    """With NORM_SCOPE kept float, the norm's RSQRT computes in float32 between int8 convs."""
    from ai_edge_litert.interpreter import Interpreter

    from sfedge.backends.tflite.ops import read_ops
    from sfedge.backends.tflite.quantize import NORM_SCOPE

    _, path, name, signature = instance_norm_tflite
    samples = _scaled_samples(name, [1.0] * 8)
    for keep, dtype in (([], np.int8), ([NORM_SCOPE], np.float32)):
        recipe = build_recipe("int8", keep)
        out = write_quantized(path, tmp_path / f"q{len(keep)}.tflite", recipe, calibrate(path, samples, signature, recipe))
        graphs, _ = read_ops(out)
        it = Interpreter(model_path=str(out))
        details = {t["index"]: t for t in it.get_tensor_details()}
        rsqrt = [op for op in graphs[0] if op.op == "RSQRT"]
        convs = [op for op in graphs[0] if op.op == "CONV_2D"]
        assert rsqrt and all(details[op.output_ids[0]]["dtype"] == dtype for op in rsqrt), keep
        assert details[convs[0].output_ids[0]]["dtype"] == np.int8
