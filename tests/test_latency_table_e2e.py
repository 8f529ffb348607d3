"""Latency tables measured for real (second tier, minutes): the table predicts a model it was not checked on.

A small U-Net (8-16 at 64x64, ONNX Runtime fp32, one thread): every conv
layer's shape alone, dense and at a grid of ranks, measured with the
profiler's workers; the table's stated error comes from uniformly factorized
whole models; a *mixed* configuration (ranks differing per layer, as a plan
has them) is then predicted within that error.  The second measurement takes
the shapes from the cache; measuring through ``--remote`` (a real SSH server
on localhost) brings the same table back.
"""

from __future__ import annotations

import shutil
import sys

import pytest

pytestmark = pytest.mark.e2e

TARGET = """name = "table-test-cpu"
description = "ONNX Runtime on this CPU at 64x64, one thread (latency-table tests)"
backend = ["onnxruntime"]
precisions = ["fp32"]
default_precision = "fp32"
layout = "NCHW"
threads = 1
input_size = [64, 64]
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import torch

    from sfedge.build import checkpoint_of
    from sfedge.models import create_model
    from sfedge.targets import load_target

    tmp = tmp_path_factory.mktemp("table")
    (tmp / "table-test-cpu.toml").write_text(TARGET)
    torch.manual_seed(0)
    return checkpoint_of(create_model("unet", widths=[8, 16])), load_target(tmp / "table-test-cpu.toml"), tmp


def _config():
    from sfedge.profile.types import MeasureConfig

    return MeasureConfig(runs=30, min_seconds=0.3, warmup_seconds=0.1, processes=1)


def test_the_table_predicts_a_mixed_model_within_its_stated_error(small, monkeypatch):
    from sfedge.latency_models import conv_layers, make_kit, rank_grid
    from sfedge.profile.latency_table import measure_kit

    ckpt, target, tmp = small
    monkeypatch.setenv("SFEDGE_CACHE", str(tmp / "cache"))
    layers = conv_layers(ckpt.model, (1, 3, 64, 64))
    mixed = {name: (2 if i % 2 else max(1, shape.in_channels // 2)) for i, (name, shape) in enumerate(layers)}
    kit = make_kit(ckpt, target, "onnxruntime", "fp32", tmp / "kit", input_shape=(1, 3, 64, 64),
                   validation=(1.0, 0.5, 0.25), extra_whole={"mixed": mixed},
                   layer_ranks={n: sorted({*rank_grid(shape, (1.0, 0.5, 0.25)), mixed[n]}) for n, shape in layers})
    table = measure_kit(kit, _config())
    rows = {v["name"]: v for v in table.validation}
    assert set(rows) == {"dense", "s=1", "s=0.5", "s=0.25", "mixed"}
    assert rows["dense"]["error"] == pytest.approx(0, abs=1e-9), "the dense model calibrates the table"
    stated = table.stated_error
    assert stated is not None and stated <= 0.30, f"the uniform models are predicted within {stated:.0%}"
    assert rows["mixed"]["predicted_ms"] == pytest.approx(table.predict(mixed))
    assert abs(rows["mixed"]["error"]) <= stated, (
        f"mixed: predicted {rows['mixed']['predicted_ms']:.3f} ms, measured {rows['mixed']['measured_ms']:.3f} ms")
    assert table.shapes_measured == len({s.key() for _, s in layers}) and table.shapes_cached == 0

    again = measure_kit(kit, _config())
    assert again.shapes_measured == 0 and again.shapes_cached == table.shapes_measured, "shapes come from the cache"


@pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("scp") is None, reason="no OpenSSH client (ssh, scp)")
def test_a_table_measured_through_remote_comes_back(small, tmp_path, monkeypatch):
    pytest.importorskip("asyncssh", reason="the dev extra's asyncssh runs the localhost SSH server")
    from sfedge.plan import latency_table, table_cache_path
    from sfedge.profile.remote import RemoteOptions

    server = _start_server(tmp_path)
    try:
        ckpt, target, tmp = small
        monkeypatch.setenv("SFEDGE_CACHE", str(tmp_path / "cache"))
        options = RemoteOptions(ssh_config=str(server["config"]), python=sys.executable)
        table = latency_table(ckpt, target, config=_config(), remote=["dev-a"], remote_options=options)
        assert table.layers and table.stated_error is not None
        assert table.device.get("hostname"), "measured by the remote's profiler (its host facts come back)"
        from sfedge.latency_models import model_key

        cached = table_cache_path(model_key(ckpt, (1, 3, 64, 64)), target.name, "onnxruntime", "fp32", 1)
        assert cached.is_file(), "the table is cached here for the next plan"
        assert list((server["home"] / ".cache" / "sfedge-remote").glob("*")) == [], "the kit is cleaned up there"
    finally:
        server["stop"]()


def _start_server(root):
    """The localhost SSH server of test_profile_remote (asyncssh), for one test."""
    import os
    import subprocess
    import time
    from pathlib import Path

    import asyncssh

    here = Path(__file__).resolve().parent
    home = root / "home"
    home.mkdir()
    client = asyncssh.generate_private_key("ssh-ed25519")
    client.write_private_key(str(root / "client_key"))
    client.write_public_key(str(root / "client_key.pub"))
    os.chmod(root / "client_key", 0o600)
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(root / "host_key"))
    port_file = root / "port"
    proc = subprocess.Popen(
        [sys.executable, str(here / "localhost_sshd.py"), "--home", str(home), "--client-pub",
         str(root / "client_key.pub"), "--host-key", str(root / "host_key"), "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the SSH server did not start")
        time.sleep(0.05)
    port = int(port_file.read_text())
    config = root / "ssh_config"
    config.write_text(f"Host dev-a\n  HostName 127.0.0.1\n  Port {port}\n  User edge\n  IdentityFile {root / 'client_key'}\n"
                      "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=10)

    return {"home": home, "config": config, "stop": stop}
