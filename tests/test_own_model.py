"""Your own model through the CLI: specs, weights, tasks, checkpoints that rebuild alone, partial builds, clear errors.

The end-to-end runs (train, factorize, build for host, phone and Jetson, verify, profile) for the user net and
MONAI's nets are in tests/test_own_model_e2e.py (the slow tier, `make test-e2e`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfedge.checkpoint import load_checkpoint, save_checkpoint
from sfedge.errors import CheckpointError, ConfigError
from sfedge.models import create_model
from sfedge.nn import SFConv2d, factorize
from sfedge.source import resolve_model

TESTS = Path(__file__).resolve().parent
USER_NET = f"{TESTS / 'user_net.py'}"
TWO_BACKENDS = """
name = "two-backends"
description = "test target: ONNX Runtime and TFLite at 64x64"
backend = ["onnxruntime", "tflite"]
precisions = ["fp32"]
threads = 1
input_size = [64, 64]
[device]
arch = "x86_64"
cores = 1
"""


@pytest.fixture()
def targets(tmp_path: Path) -> Path:
    folder = tmp_path / "targets"
    folder.mkdir()
    (folder / "two-backends.toml").write_text(TWO_BACKENDS)
    return folder


def _json(stdout: str):
    return json.loads(stdout[stdout.index("{"):])


def _error(stderr: str) -> str:
    """The CLI's one error line (progress bars draw above it on stderr)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("sfedge ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_user_file_builds_saves_and_rebuilds_from_its_checkpoint_alone(tmp_path) -> None:
    ck = resolve_model(f"{USER_NET}:make_net", config={"classes": 3, "width": 8})
    assert ck.name == "make_net" and ck.source["kind"] == "file" and len(ck.source["file_sha256"]) == 64
    assert ck.metrics.get("untrained") is True
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ck.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = tmp_path / "w.pt"
    torch.save(ck.model.state_dict(), weights)
    again = resolve_model(f"{USER_NET}:make_net", config={"classes": 3, "width": 8}, weights=weights, task="multiclass")
    assert again.weights_sha256 != ck.weights_sha256 and again.metrics == {"weights_file": "w.pt"}
    factorize(again.model, s=0.25)
    with pytest.raises(CheckpointError, match="factorized in place"):
        save_checkpoint(again.model, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    save_checkpoint(again.model, tmp_path / "sf.safetensors", task="multiclass", record_factorization=True)
    loaded = load_checkpoint(tmp_path / "sf.safetensors")  # no spec, config or weights given: the file suffices
    assert loaded.task == "multiclass" and loaded.factorized and loaded.source["spec"].endswith("user_net.py:make_net")
    assert sum(isinstance(m, SFConv2d) for m in loaded.model.modules()) == len(loaded.factorized)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), again.model.eval()(x))


def test_registry_model_factorized_in_place_is_refused_with_what_to_do(tmp_path) -> None:
    model = create_model("unet", widths=[8, 16])
    factorize(model, s=0.25)
    with pytest.raises(CheckpointError, match="sfedge factorize") as e:
        save_checkpoint(model, tmp_path / "x.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "x.safetensors").exists()


def test_factorize_table_lists_transposed_convs_as_kept_dense() -> None:
    from test_own_model_helpers import upsampler

    report = factorize(upsampler(), s=0.5)
    rows = {r.name: r for r in report.rows}
    kept = [r for r in report.rows if r.rank is None]
    assert any("transposed conv" in r.note for r in kept) and rows["6"].note == "transposed conv (kept dense)"


def test_litert_rewrite_of_padded_transposed_convs_is_exact() -> None:
    from test_own_model_helpers import upsampler

    from sfedge.backends.tflite.rewrite import CroppedConvTranspose2d, rewrite_for_litert

    model = upsampler().eval()
    rewritten, notes = rewrite_for_litert(model, (1, 3, 64, 64))
    assert notes and "1 ConvTranspose2d" in notes[0]
    assert isinstance(rewritten[6], CroppedConvTranspose2d) and isinstance(model[6], torch.nn.ConvTranspose2d)
    for k, s, p, op in [(3, 2, 1, 1), (4, 2, 1, 0), (3, 2, 1, 0), (5, 3, 2, 1)]:
        conv = torch.nn.ConvTranspose2d(4, 6, k, s, padding=p, output_padding=op).eval()
        x = torch.randn(2, 4, 13, 11)
        with torch.no_grad():
            torch.testing.assert_close(CroppedConvTranspose2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_a_torch_export_program_loads_without_its_code(tmp_path) -> None:
    from test_own_model_helpers import upsampler

    model = upsampler().eval()
    path = tmp_path / "up.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 64, 64),)), str(path))
    ck = resolve_model(path)
    assert ck.name == "up" and ck.input_shape == (1, 3, 64, 64) and ck.source["kind"] == "exported"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), model(x))
    with pytest.raises(ConfigError, match="carries its own"):
        resolve_model(path, weights=tmp_path / "w.pt")


def test_model_spec_errors_say_what_to_run_instead(tmp_path) -> None:
    weights = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match="holds weights.*--weights"):
        resolve_model(weights)
    with pytest.raises(ConfigError, match="'nope' is not a callable.*make_net"):
        resolve_model(f"{USER_NET}:nope")
    with pytest.raises(ConfigError, match="takes no argument.*bogus.*its arguments: classes, width"):
        resolve_model(f"{USER_NET}:make_net", config={"bogus": 1})
    torch.save(create_model("unet", widths=[8, 16]).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(CheckpointError, match="does not match the model.*--config"):
        resolve_model(f"{USER_NET}:make_net", weights=tmp_path / "unet.pt")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.nets'"):
        resolve_model("no_such_pkg.nets:Net")


def test_entry_point_registered_model_builds_by_name(tmp_path, sfedge_cli, targets) -> None:
    """A package registering `sfedge.models` entry points: `sfedge build mypkg-net` after installing it."""
    site = tmp_path / "site"
    pkg = site / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from torch import nn\n\n\ndef make(width: int = 4):\n    \"\"\"a tiny net\"\"\"\n"
                                     "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),\n"
                                     "                         nn.Conv2d(width, 1, 3, padding=1))\n")
    dist = site / "mypkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sfedge.models]\nmypkg-net = mypkg:make\n")
    env = {"PYTHONPATH": f"{site}:{TESTS.parent}", "SFEDGE_TARGETS": str(targets)}
    rc, out, err = sfedge_cli("inspect", "--models", "--json", env=env)
    assert rc == 0, err
    assert any(m["name"] == "mypkg-net" and m["defaults"] == {"width": 4} for m in json.loads(out))
    rc, out, err = sfedge_cli("build", "mypkg-net", "--config", '{"width": 6}', "--target", "two-backends",
                              "--require", "onnxruntime", "-o", "b", "--json", env=env)
    assert rc == 0, err
    manifest = json.loads((Path(_json(out)["bundles"][0]["bundle"]) / "manifest.json").read_text()
                          if Path(_json(out)["bundles"][0]["bundle"]).is_absolute()
                          else (tmp_path / _json(out)["bundles"][0]["bundle"] / "manifest.json").read_text())
    assert manifest["model"]["source"]["kind"] == "entry_point" and manifest["model"]["config"] == {"width": 6}
    assert manifest["model"]["task"] == "binary"


def test_one_failing_backend_keeps_the_other_and_exits_partial(tmp_path, sfedge_cli, targets) -> None:
    env = {"SFEDGE_TARGETS": str(targets)}
    rc, out, err = sfedge_cli("build", f"{USER_NET}:make_det_net", "--target", "two-backends", "-o", "b", "--json",
                              env=env)
    assert rc == 4, err  # EXIT_PARTIAL
    summary = _json(out)["bundles"][0]
    bundle = tmp_path / summary["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [a["backend"] for a in manifest["artifacts"]] == ["onnxruntime"]
    assert manifest["failures"][0]["backend"] == "tflite" and "litert-torch" in manifest["failures"][0]["error"]
    assert not list(bundle.glob("*.tflite"))
    rc, _, err = sfedge_cli("verify", str(bundle), env=env)
    assert rc == 0, err  # what the bundle holds is checked and passes
    rc, _, err = sfedge_cli("build", f"{USER_NET}:make_det_net", "--target", "two-backends", "-o", "c",
                            "--require", "tflite", env=env)
    assert rc == 2 and "litert-torch" in _error(err)
    assert not (tmp_path / "c" / "make_det_net__two-backends__fp32").exists()


def test_cli_tolerance_override_is_checked_and_recorded(tmp_path, sfedge_cli, targets) -> None:
    env = {"SFEDGE_TARGETS": str(targets)}
    rc, _, err = sfedge_cli("build", "unet", "--target", "two-backends", "--tolerance", "nonsense=1", env=env)
    assert rc == 2 and "--tolerance" in _error(err) and "keys:" in _error(err)
    rc, _, err = sfedge_cli("build", "unet", "--config", '{"widths": [8, 16]}', "--target", "two-backends",
                            "--require", "onnxruntime", "--tolerance", "cosine=1.5", "-o", "b", env=env)
    assert rc == 2 and "cosine" in _error(err)  # nothing can meet cosine 1.5: a clear one-line error
    assert not list((tmp_path / "b").glob("unet*"))


def test_large_logit_model_passes_fp32_relative_and_the_manifest_says_the_task(tmp_path, sfedge_cli, targets) -> None:
    """A net with logits in the tens (MONAI's nets reach ~15): fp32 is judged relative to the output range."""
    env = {"SFEDGE_TARGETS": str(targets)}
    rc, out, err = sfedge_cli("build", f"{TESTS / 'test_own_model_helpers.py'}:loud_net", "--task", "binary",
                              "--target", "two-backends", "-o", "b", "--json", env=env)
    assert rc == 0, err
    bundle = tmp_path / _json(out)["bundles"][0]["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        p = art["parity"]
        assert p["reference_range"] > 20 and p["relative_max_abs"] < 1e-4 and p["task"] == "binary"
    assert manifest["model"]["task"] == "binary" and "logit > 0" in (bundle / "README.md").read_text()


def test_python_api_builds_an_nn_module(tmp_path, targets, monkeypatch) -> None:
    from test_own_model_helpers import loud_net

    from sfedge.build import build_bundle

    monkeypatch.setenv("SFEDGE_TARGETS", str(targets))
    result = build_bundle(loud_net(), "two-backends", out_dir=tmp_path, require=["onnxruntime", "tflite"])
    m = result.bundle.manifest
    assert m["model"]["source"]["kind"] == "python" and not result.partial
    inputs, reference = result.bundle.reference()
    assert reference.shape == (len(inputs), 1, 64, 64) and np.isfinite(reference).all()


def test_pt_without_code_is_one_line_through_the_cli(tmp_path, sfedge_cli) -> None:
    torch.save(create_model("unet", widths=[8, 16]).state_dict(), tmp_path / "model.pt")
    rc, _, err = sfedge_cli("build", "model.pt")
    assert rc == 2 and "holds weights" in _error(err) and "--weights" in _error(err)
    rc, _, err = sfedge_cli("factorize", "model.pt2", "--s", "0.5")
    assert rc == 2 and "model.pt2" in err


def test_the_subprocess_cli_finds_the_user_file_relative_to_its_working_folder(tmp_path) -> None:
    (tmp_path / "mynet.py").write_text((TESTS / "user_net.py").read_text())
    p = subprocess.run([sys.executable, "-m", "sfedge.cli", "inspect", "mynet.py:make_net", "--config",
                        '{"width": 8}', "--input-size", "32", "32", "--json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = _json(p.stdout)
    assert info["task"] == "multiclass" and info["input_shape"] == [1, 1, 32, 32] and info["source"]["kind"] == "file"
