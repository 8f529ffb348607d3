"""Export: one self-contained, simplified, checked ONNX file per model, or nothing at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exporting import export_checked

from sfedge.errors import ExportError
from sfedge.onnx_metadata import read_onnx_metadata
from sfedge.parity import Tolerance
from sfedge.source import ModelSource

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(demo_sources, fundus_calibration, tmp_path_factory):
    """The trained demo U-Nets exported once, checked on the held-out fundus crops."""
    folder = tmp_path_factory.mktemp("export")
    return {
        name: export_checked(src, folder / f"{name}.onnx", check_inputs=fundus_calibration.holdout)
        for name, src in demo_sources.items()
    }


@pytest.mark.parametrize("name", ["unet", "unet-sfconv"])
def test_export_matches_torch_on_real_images(exported, demo_sources, fundus_calibration, name) -> None:
    art = exported[name]
    tol = Tolerance(max_abs=1e-4, cosine=0.99999)
    assert tol.failures(art.parity) == []
    assert art.parity.samples == len(fundus_calibration.holdout)
    assert art.parity.reference_range > 1.0  # a trained model: outputs are not near-constant
    # The file really is what was checked: rerun it independently.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    x = fundus_calibration.holdout[:1]
    out = sess.run(None, {"input": x})[0]
    assert np.abs(out - demo_sources[name].reference(x)).max() < 1e-4


@pytest.mark.parametrize("name", ["unet", "unet-sfconv"])
def test_export_is_one_file_with_static_shape_opset_and_metadata(exported, demo_sources, name) -> None:
    art, src = exported[name], demo_sources[name]
    assert sorted(p.name for p in art.path.parent.iterdir()) == ["unet-sfconv.onnx", "unet.onnx"]  # no .data, no temp
    model = onnx.load(str(art.path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "output")
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == list(src.input_shape)
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 1, *src.input_shape[2:]]
    meta = read_onnx_metadata(art.path)
    assert meta["model"] == name and meta["config"] == src.config
    assert meta["weights_sha256"] == src.weights_sha256
    assert meta["input"]["shape"] == list(src.input_shape) and meta["input"]["name"] == "input"
    assert meta["s"] == (src.config["s"] if name == "unet-sfconv" else None)
    assert meta["opset"] == 17 and meta["precision"] == "fp32"
    assert meta["preprocessing"] == src.preprocessing
    assert (art.kind, art.precision, art.backend) == ("onnx", "fp32", "onnxruntime")
    assert [t.name for t in art.inputs] == ["input"] and [t.name for t in art.outputs] == ["output"]


def test_export_is_simplified(tmp_path) -> None:
    """onnxslim folds the exporter's Constant nodes and shape arithmetic (the Factorizer has plenty)."""
    from test_factorizer import _perturbed

    model = _perturbed("factorizer-sfconv", widths=[16, 32], input_size=[32, 32])
    src = ModelSource(model, "factorizer-sfconv", model.sfedge_config, "perturbed", (1, 3, 32, 32))
    raw = onnx.load(str(export_checked(src, tmp_path / "raw.onnx", simplify=False).path))
    slim = export_checked(src, tmp_path / "slim.onnx")
    nodes = onnx.load(str(slim.path)).graph.node
    assert len(nodes) < len(raw.graph.node)
    assert any(n.op_type == "Constant" for n in raw.graph.node)
    assert not any(n.op_type in ("Constant", "Identity") for n in nodes)
    assert slim.parity.max_abs < 1e-4


@pytest.mark.parametrize(
    ("name", "cfg"),
    [("factorizer", {}), ("factorizer-sfconv", {"widths": [16, 32], "input_size": [32, 32], "swin": True})],
    ids=["factorizer", "factorizer-sfconv-swin"],
)
def test_factorizer_export_matches_torch(tmp_path, name, cfg) -> None:
    from test_factorizer import _perturbed  # seeded noise on every weight + an all-zero NMF head

    model = _perturbed(name, **cfg)
    h, w = model.input_size
    src = ModelSource(model, name, model.sfedge_config, "perturbed", (1, 3, h, w))
    x = np.random.default_rng(3).random((2, 3, h, w), dtype=np.float32)
    ref = src.reference(x)
    assert ref.std() > 0.05  # non-trivial outputs
    art = export_checked(src, tmp_path / f"{name}.onnx", check_inputs=x)
    assert art.parity.max_abs < 1e-4 and art.parity.cosine > 0.99999
    assert read_onnx_metadata(art.path)["config"]["swin"] == cfg.get("swin", False)


class _TracedBranch(torch.nn.Module):
    """Data-dependent control flow: tracing freezes the branch the zero dummy input takes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if bool(x.mean() > 0):  # positive images take a branch the exported graph does not have
            return y * 2.0
        return y


def test_export_that_disagrees_with_torch_fails_and_writes_nothing(tmp_path) -> None:
    torch.manual_seed(0)
    src = ModelSource(_TracedBranch().eval(), "traced-branch", {}, "none", (1, 3, 16, 16))
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32) + 0.5
    target = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError, match="disagrees with the torch model") as err:
        export_checked(src, target, check_inputs=x)
    assert "\n" not in str(err.value)
    assert list(target.parent.iterdir()) == []  # no model, no temporary file
    # The same model with inputs on the traced branch exports fine: the check, not the exporter, refused it.
    ok = export_checked(src, target, check_inputs=-x)
    assert ok.path.is_file()


@pytest.mark.parametrize("opset", [13, 18])
def test_opset_is_configurable(tmp_path, opset) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1)).eval()
    src = ModelSource(model, "tiny", {}, "none", (1, 3, 16, 16))
    art = export_checked(src, tmp_path / "tiny.onnx", opset=opset)
    model_proto = onnx.load(str(art.path))
    assert {o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    assert read_onnx_metadata(art.path)["opset"] == opset == art.meta["opset"]


def test_check_inputs_of_the_wrong_size_are_refused(demo_sources, tmp_path) -> None:
    with pytest.raises(ExportError, match="input size"):
        export_checked(demo_sources["unet"], tmp_path / "m.onnx", check_inputs=np.zeros((1, 3, 64, 64), np.float32))
    assert not (tmp_path / "m.onnx").exists()


def test_metadata_of_a_foreign_onnx_is_empty(tmp_path) -> None:
    torch.onnx.export(torch.nn.ReLU(), (torch.zeros(1, 2),), str(tmp_path / "relu.onnx"), dynamo=False)
    assert read_onnx_metadata(tmp_path / "relu.onnx") == {}
