"""The TensorRT type check (`make typecheck`): it passes on sfedge, and it fails on code that misuses TensorRT's API.

TensorRT cannot run here, so this check is what stands between a misspelt TensorRT call and a Jetson.  A check
that cannot fail proves nothing: the second test plants wrong attributes in a small file and expects mypy to name
each one, with the same stubs and configuration `make typecheck` uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import typecheck  # noqa: E402  (tests/typecheck.py: what the Makefile runs)


@pytest.fixture(scope="module")
def stubs() -> Path:
    folder = typecheck.stubs_dir()
    if not (folder / typecheck.STAMP).is_file():
        pytest.fail(f"no TensorRT stubs in {folder}: run `make setup` (or {sys.executable} tests/typecheck.py install)")
    return folder


def test_tensorrt_backend_passes_the_strict_check(stubs: Path) -> None:
    proc = typecheck.check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


FIXTURE = '''
from __future__ import annotations

import tensorrt as trt


def build(logger: trt.ILogger) -> None:
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.set_flag(trt.BuilderFlag.{flag})
    network.{network_call}


def run(engine: trt.ICudaEngine, context: trt.IExecutionContext, stream: int) -> bool:
    n = engine.{engine_attr}
    return n > 0 and context.{execute}
'''
RIGHT = dict(flag="FP16", network_call="mark_output(network.get_input(0))", engine_attr="num_io_tensors",
             execute="execute_async_v3(stream)")
WRONG = dict(flag="NO_SUCH_FLAG", network_call="no_such_method()", engine_attr="num_bindings",
             execute="execute_async_v2([], stream)")  # the last two: TensorRT 8.x's bindings API, removed in 10


def test_check_names_every_wrong_tensorrt_attribute(stubs: Path, tmp_path: Path) -> None:
    right, wrong = tmp_path / "right_trt.py", tmp_path / "wrong_trt.py"
    right.write_text(textwrap.dedent(FIXTURE.format(**RIGHT)))
    wrong.write_text(textwrap.dedent(FIXTURE.format(**WRONG)))
    ok = typecheck.check([str(right)])
    assert ok.returncode == 0, ok.stdout  # the same code with real attributes passes: the failures below are the API
    bad = typecheck.check([str(wrong)])
    assert bad.returncode == 1, bad.stdout
    errors = [ln for ln in bad.stdout.splitlines() if ": error:" in ln and "[attr-defined]" in ln]
    for attr in ("NO_SUCH_FLAG", "no_such_method", "num_bindings", "execute_async_v2"):
        assert any(f'"{attr}"' in ln for ln in errors), (attr, bad.stdout)
    assert len(errors) == 4, bad.stdout  # one per planted attribute, nothing else about the API


def test_repair_fixes_exactly_the_two_known_defects(tmp_path: Path) -> None:
    """The repairs are checked by count: a stubs release with other defects is refused, not half-checked."""
    stub = tmp_path / typecheck.STUB_FILE
    stub.parent.mkdir()
    plugin = "    def get_workspace_size(self, in: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> int: ...\n"
    scale = ("    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, scale: Weights = None, "
             "power: Weights = None, channel_axis: int) -> IScaleLayer: ...\n")
    stub.write_text("class X:\n" + plugin * 4 + scale)
    assert typecheck.repair(tmp_path) == {what: n for what, _, _, n in typecheck.REPAIRS}
    text = stub.read_text()
    assert "in_: list[PluginTensorDesc]" in text and " in: " not in text and "channel_axis: int = ...)" in text
    compile(text.replace("...)", "0)"), str(stub), "exec")  # now valid Python syntax
    stub.write_text("class X:\n" + plugin * 3 + scale)
    with pytest.raises(typecheck.TypecheckSetupError, match="expected 4"):
        typecheck.repair(tmp_path)


def test_installed_stubs_do_not_make_tensorrt_importable(stubs: Path) -> None:
    """The stubs carry a `tensorrt/` folder; on sys.path it would import as an empty package and pass for TensorRT."""
    assert (stubs / "tensorrt" / "__init__.pyi").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True, text=True, env=env,
                          cwd=stubs.parent.parent)
    assert proc.returncode != 0 and "No module named 'tensorrt'" in proc.stderr
