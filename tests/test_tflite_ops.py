"""The .tflite op report: counts, TRANSPOSEs at the I/O, XNNPACK fallbacks and Flex ops, on real converted files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

import torch  # noqa: E402

from sfedge.backends.tflite.convert import convert_float  # noqa: E402
from sfedge.backends.tflite.ops import op_report  # noqa: E402
from sfedge.backends.tflite.runner import TFLiteRunner  # noqa: E402
from sfedge.errors import BackendUnavailable, ExportError  # noqa: E402


class ConvThenCumsum(torch.nn.Module):
    """A conv (XNNPACK runs it) followed by a cumulative sum over channels (XNNPACK has no CUMSUM)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.conv(x), dim=1)


@pytest.fixture(scope="module")
def cumsum_tflite(tmp_path_factory) -> Path:
    return convert_float(ConvThenCumsum().eval(), (1, 3, 32, 32), "NHWC", tmp_path_factory.mktemp("ops") / "cumsum.tflite")


def _with_flex_op(src: Path, dst: Path, replace: str, flex_name: str) -> Path:
    """Rewrite every ``replace`` op of a real .tflite as the custom op ``flex_name``.

    This is how TensorFlow's converter stores a select-TF op (builtin code
    CUSTOM, custom code "Flex<TF op>"), written with the flatbuffer schema
    ai-edge-litert ships.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(src))
    for code in model.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == getattr(schema.BuiltinOperator, replace):
            code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
            code.customCode = flex_name
    flatbuffer_utils.write_model(model, str(dst))
    return dst


def test_planted_op_xnnpack_cannot_run_is_reported(cumsum_tflite: Path) -> None:
    report = op_report(cumsum_tflite)
    assert report.ops["CUMSUM"] == 1 and report.ops["CONV_2D"] == 1
    assert report.not_delegated == {"CUMSUM": 1}
    assert report.delegated["CONV_2D"] == 1
    assert report.fully_delegated is False
    assert [o["op"] for o in report.fallback_ops] == ["CUMSUM"]
    assert any("CUMSUM" in w for w in report.warnings)
    assert report.errors == []  # it runs, only slower
    assert report.summary()["xnnpack_fallback"] == {"CUMSUM": 1}


def test_planted_flex_op_is_an_error(cumsum_tflite: Path, tmp_path: Path) -> None:
    flex = _with_flex_op(cumsum_tflite, tmp_path / "flex.tflite", "CUMSUM", "FlexCumsum")
    report = op_report(flex)
    assert report.flex_ops == ["FlexCumsum"]
    assert report.errors and "tflite-runtime" in report.errors[0]
    with pytest.raises(ExportError) as e:
        report.raise_for_errors()
    assert "FlexCumsum" in str(e.value) and "\n" not in str(e.value)
    # The error is real: the interpreter refuses the file.
    with pytest.raises(BackendUnavailable):
        with TFLiteRunner(flex, threads=1):
            pass


def test_transposes_at_io_are_found_only_for_nchw(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    nhwc = op_report(convert_float(model, (1, 3, 16, 16), "NHWC", tmp_path / "nhwc.tflite"))
    nchw = op_report(convert_float(model, (1, 3, 16, 16), "NCHW", tmp_path / "nchw.tflite"))
    assert nhwc.transposes == 0 and not nhwc.transpose_at_input and not nhwc.transpose_at_output
    assert nchw.transpose_at_input and nchw.transpose_at_output and nchw.transposes >= 2


def test_report_counts_every_op_the_interpreter_sees(cumsum_tflite: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(str(cumsum_tflite), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    names = [d["op_name"] for d in interp._get_ops_details()]
    report = op_report(cumsum_tflite)
    assert report.total == len(names)
    assert [o.op for o in report.per_op] == names
    d = report.as_dict(per_op=True)
    assert d["per_op"][0]["op"] == names[0] and "per_op" not in report.as_dict()


def test_unreadable_file_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    with pytest.raises(ExportError) as e:
        op_report(bad)
    assert "not a readable .tflite" in str(e.value) and "\n" not in str(e.value)
