"""Remote profiling over real SSH: an asyncssh server on localhost, driven by the system ssh/scp clients."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from profiling_workloads import matmul_chain, wrap_bundle

asyncssh = pytest.importorskip("asyncssh", reason="the dev extra's asyncssh runs the localhost SSH server")
if shutil.which("ssh") is None or shutil.which("scp") is None:
    pytest.skip("the OpenSSH client (ssh, scp) is not installed", allow_module_level=True)

HERE = Path(__file__).resolve().parent
FAST = ["--runs", "10", "--min-seconds", "0.1", "--warmup-seconds", "0.05"]


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory):
    """A real SSH server on 127.0.0.1 with a generated host key and one authorized client key; its home folder."""
    root = tmp_path_factory.mktemp("ssh")
    home = root / "home"
    home.mkdir()
    client = asyncssh.generate_private_key("ssh-ed25519")
    client.write_private_key(str(root / "client_key"))
    client.write_public_key(str(root / "client_key.pub"))
    os.chmod(root / "client_key", 0o600)
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(root / "host_key"))
    port_file = root / "port"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "localhost_sshd.py"), "--home", str(home), "--client-pub",
         str(root / "client_key.pub"), "--host-key", str(root / "host_key"), "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the SSH server did not start: {proc.stderr.read()[-500:]}")
        time.sleep(0.05)
    port = int(port_file.read_text())
    # An ssh config with two aliases for the server: two "devices", and the config file path is honoured (-F).
    config = root / "ssh_config"
    config.write_text("".join(
        f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User edge\n  IdentityFile {root / 'client_key'}\n"
        "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        for alias in ("dev-a", "dev-b")))
    yield {"home": home, "port": port, "key": root / "client_key", "config": config}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundles")
    sf = wrap_bundle(tmp / "chain-sf", [{"file": matmul_chain(tmp / "a.onnx", 2, 128), "backend": "onnxruntime"}],
                     model="chain-sfconv", conv="sfconv", s=0.5)
    van = wrap_bundle(tmp / "chain", [{"file": matmul_chain(tmp / "b.onnx", 4, 128), "backend": "onnxruntime"}],
                      model="chain")
    return sf, van


def _ssh_options(server) -> list[str]:
    """The flags a user would pass for an unlisted device: -o options only (same for ssh and scp)."""
    opts = [f"Port={server['port']}", f"IdentityFile={server['key']}", "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null", "IdentitiesOnly=yes"]
    return [a for o in opts for a in ("--ssh-option", o)]


def test_remote_profile_brings_the_report_back(ssh_server, bundles, tmp_path, sfedge_cli):
    sf, van = bundles
    code, out, err = sfedge_cli(
        "profile", str(sf), "--pair", str(van), "--remote", "edge@127.0.0.1", *_ssh_options(ssh_server),
        "--remote-python", sys.executable, "-o", str(tmp_path / "out"), *FAST, "--json", timeout=300,
    )
    assert code == 0, err
    result = json.loads(out)
    report_dir = Path(result["reports"]["edge@127.0.0.1"])
    assert report_dir == tmp_path / "out" / "127.0.0.1"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["device"] == "127.0.0.1" and report["host"]["ssh"] == "edge@127.0.0.1"
    [pair] = report["pairings"]
    assert pair["candidate"].startswith("chain-sfconv(s=0.5)") and pair["rounds"] >= 20
    assert all(len(m["samples_ms"]) >= 10 for m in report["measurements"])
    assert (report_dir / "latency.png").is_file(), "plots are drawn here, not on the device"
    leftovers = list((ssh_server["home"] / ".cache" / "sfedge-remote").glob("*"))
    assert leftovers == [], "the copied bundles and the remote report are cleaned up"


def test_two_devices_in_parallel_through_an_ssh_config(ssh_server, bundles, tmp_path, sfedge_cli):
    sf, van = bundles
    code, out, err = sfedge_cli(
        "profile", str(sf), "--pair", str(van), "--remote", "dev-a", "--remote", "dev-b",
        "--ssh-config", str(ssh_server["config"]), "--remote-python", sys.executable, "-o", str(tmp_path / "out"),
        *FAST, "--json", timeout=300,
    )
    assert code == 0, err
    result = json.loads(out)
    assert set(result["reports"]) == {"dev-a", "dev-b"}
    assert {p["device"] for p in result["pairs"]} == {"dev-a", "dev-b"}
    assert (tmp_path / "out" / "compare" / "compare.json").is_file()


def test_a_remote_without_sfedge_is_told_exactly_what_to_install(ssh_server, bundles, tmp_path, sfedge_cli):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    sf, van = bundles
    code, out, err = sfedge_cli(
        "profile", str(sf), "--pair", str(van), "--remote", "edge@127.0.0.1", *_ssh_options(ssh_server),
        "--remote-python", str(bare / "bin" / "python"), "-o", str(tmp_path / "out"), *FAST, timeout=120,
    )
    assert code != 0
    line = err.strip().splitlines()[-1]
    assert "cannot import what profiling needs" in line and "sfedge 0.1.0" in line
    assert "onnxruntime>=1.17,<2" in line, "only the runtime the bundles need is named"
    assert "ai-edge-litert" not in line and "--install" in line


def test_an_unreachable_host_fails_with_one_line(bundles, tmp_path, sfedge_cli):
    sf, _ = bundles
    code, out, err = sfedge_cli(
        "profile", str(sf), "--remote", "edge@127.0.0.1", "--ssh-option", "Port=1", "--ssh-option",
        "ConnectTimeout=5", "-o", str(tmp_path / "out"), timeout=60,
    )
    assert code != 0
    line = err.strip().splitlines()[-1]
    assert line.startswith("sfedge profile: error:") and "127.0.0.1" in line and "probing" in line


def test_missing_requirements_name_only_what_the_bundles_need():
    from sfedge import __version__
    from sfedge.profile.remote import missing_requirements

    mods = {"numpy": True, "psutil": True, "rich": True, "onnxruntime": False, "ai_edge_litert.interpreter": False,
            "tflite_runtime.interpreter": True, "tensorrt": False}
    probe = {"sfedge": __version__, "modules": mods}
    assert missing_requirements(probe, ["tflite"]).pip == [], "tflite-runtime is an accepted TFLite interpreter"
    m = missing_requirements(probe, ["onnxruntime", "tflite"])
    assert m.pip == ["onnxruntime>=1.17,<2"] and not m.sfedge and not m.blocking
    trt = missing_requirements(probe, ["tensorrt"])
    assert trt.blocking and "JetPack" in trt.blocking[0] and trt.pip == []
    old = missing_requirements({"sfedge": "0.0.1", "modules": {**mods, "onnxruntime": True}}, ["onnxruntime"])
    assert old.outdated == "0.0.1" and old.pip == []
