"""A bundle is untrusted input (issue 11): each defect found by attacking sfedge as a stranger, through the real CLI.

One signed ONNX Runtime bundle (64x64, trained demo weights) is built per module
and copied for each tampering; one TensorRT device-folder bundle is built for the
on-device build, where only TensorRT itself (builder, GPU probe, runner) is
replaced by stand-ins (``tests/fake_tensorrt/sitecustomize.py``).  The CLI runs
as ``python -P -m sfedge.cli``, like the ``sfedge`` console script, which does not
put the working folder on ``sys.path`` either.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sfedge.fileio import sha256_file

HERE = Path(__file__).resolve().parent
TARGET = """
name = "sec-small"
description = "test target: ONNX Runtime only, small input"
backend = "onnxruntime"
precisions = ["fp32"]
threads = 1
input_size = [64, 64]
{extra}
[device]
arch = "x86_64"
"""
JETSON = """
name = "sec-jetson"
description = "test target: a Jetson Orin at 64x64"
backend = "tensorrt"
precisions = ["fp32"]
threads = 1
input_size = [64, 64]
[tolerances.fp32]
max_abs = 1e-3
cosine = 0.9999
[device]
tensorrt = "10.3"
sm = 87
"""
QUICK = ["--runs", "3", "--min-seconds", "0", "--warmup-runs", "1", "--warmup-seconds", "0", "--processes", "1",
         "--no-plots"]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 900) -> tuple[int, str, str]:
    """Run `sfedge` in a subprocess: (returncode, stdout, stderr)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-P", "-m", "sfedge.cli", *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def error_line(err: str, verb: str) -> str:
    """The one `sfedge VERB: error:` line (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"sfedge {verb}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_checkpoints) -> dict:
    """Targets, SSH keys and one signed bundle built through the CLI."""
    root = tmp_path_factory.mktemp("security")
    targets = root / "targets"
    targets.mkdir()
    (targets / "sec-small.toml").write_text(TARGET.format(extra=""))
    (targets / "sec-jetson.toml").write_text(JETSON)
    keys = root / "keys"
    keys.mkdir()
    for name in ("builder", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@example", "-f",
                        str(keys / name)], check=True)
    pub = (keys / "builder.pub").read_text().split()
    (keys / "allowed_signers").write_text(f"builder@example {pub[0]} {pub[1]}\n")
    env = {"SFEDGE_TARGETS": str(targets)}
    rc, out, err = cli("build", str(demo_checkpoints["unet"]), "-t", "sec-small", "-o", str(root / "bundles"),
                       "--sign", str(keys / "builder"), "--json", cwd=root, env=env)
    assert rc == 0, err
    bundle = Path(json.loads(out)["bundles"][0]["bundle"])
    bundle = bundle if bundle.is_absolute() else root / bundle
    assert (bundle / "manifest.json.sig").is_file()
    return {"root": root, "targets": targets, "keys": keys, "env": env, "bundle": bundle,
            "ckpt": demo_checkpoints["unet"]}


def copy_bundle(world: dict, dest: Path) -> Path:
    shutil.copytree(world["bundle"], dest, symlinks=True)
    return dest


def edit_manifest(bundle: Path, edit, rehash: tuple[str, ...] = ()) -> None:
    """Apply ``edit`` to the manifest dict (re-hashing ``rehash`` files first, as a careful forger would)."""
    m = json.loads((bundle / "manifest.json").read_text())
    for rel in rehash:
        m["files"][rel] = {"sha256": sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}
        for a in m["artifacts"]:
            if a["path"] == rel:
                a["sha256"], a["size"] = m["files"][rel]["sha256"], m["files"][rel]["size"]
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


# -- 1. no code from a bundle or the working folder runs ---------------------------------------------------------
PLANT = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def test_planted_module_in_a_bundle_does_not_run_and_fails_verify(world, tmp_path) -> None:
    bundle = copy_bundle(world, tmp_path / "bundle")
    marker = tmp_path / "PLANTED-MODULE-RAN"
    (bundle / "psutil.py").write_text(PLANT.format(marker=str(marker)) + "from psutil_real import *\n")
    # As the bundle README says: profile from inside the bundle.  The worker must not import ./psutil.py.
    rc, out, err = cli("profile", ".", *QUICK, "-o", str(tmp_path / "report"), cwd=bundle, env=world["env"])
    assert rc == 0, err
    assert not marker.exists(), "the planted psutil.py ran in the profiling worker"
    rc, out, err = cli("verify", ".", cwd=bundle, env=world["env"])
    assert rc == 1 and "FAIL" in out
    assert "not in the manifest: psutil.py" in err


def test_gpu_probe_does_not_import_from_the_working_folder(tmp_path, monkeypatch) -> None:
    from sfedge.backends.tensorrt.gpu import PROBE, _run_probe

    marker = tmp_path / "PLANTED-CTYPES-RAN"
    for name in ("ctypes", "json"):
        (tmp_path / f"{name}.py").write_text(PLANT.format(marker=str(marker)) + "raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)  # `sfedge build ..` from inside a TensorRT device folder
    report = _run_probe(PROBE, 60)
    assert report is not None and "gpu" in report, "the probe did not run with the real ctypes and json"
    assert not marker.exists(), "the planted ctypes.py/json.py ran in the GPU probe"


# -- 2. no user file is ever deleted -------------------------------------------------------------------------------
def test_output_folders_with_user_files_are_refused_and_sfedge_outputs_replaced(world, tmp_path) -> None:
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    b = str(world["bundle"])
    for args, verb in ((["profile", b, *QUICK], "profile"), (["sweep", "unet", "--s", "0.5"], "sweep")):
        rc, _, err = cli(*args, "-o", str(mine), cwd=tmp_path, env=world["env"])
        assert rc == 2, err
        line = error_line(err, verb)
        assert str(mine) in line and "choose a new folder" in line
    # A real report, re-written in place (its marker says it is one), then compared into the user's folder.
    report = tmp_path / "report"
    for _ in range(2):
        rc, _, err = cli("profile", b, *QUICK, "-o", str(report), cwd=tmp_path, env=world["env"])
        assert rc == 0, err
    assert (report / "report.json").is_file()
    rc, _, err = cli("compare", str(report), "-o", str(mine), "--no-plots", cwd=tmp_path)
    assert rc == 2 and str(mine) in error_line(err, "compare")
    rc, _, err = cli("compare", str(report), "-o", str(report), "--no-plots", cwd=tmp_path)
    assert rc == 2 and "profile output, not a compare output" in error_line(err, "compare")
    assert (mine / "thesis.tex").read_text() == "three years of work" and len(list(mine.iterdir())) == 1
    assert (report / "report.json").is_file()
    for verb in ("profile", "compare", "sweep"):
        rc, out, _ = cli(verb, "--help", cwd=tmp_path)
        assert rc == 0 and "any other non-empty folder is refused" in " ".join(out.split())


def test_build_never_replaces_a_folder_that_is_not_a_bundle(world, tmp_path) -> None:
    out = tmp_path / "bundles"
    name = world["bundle"].name
    (out / name).mkdir(parents=True)
    (out / name / "notes.txt").write_text("mine")
    rc, _, err = cli("build", str(world["ckpt"]), "-t", "sec-small", "-o", str(out), cwd=tmp_path, env=world["env"])
    assert rc == 2 and "exists and is not a bundle" in error_line(err, "build")
    assert (out / name / "notes.txt").read_text() == "mine"


# -- 3. verify means something ----------------------------------------------------------------------------------------
def _drop(key):
    return lambda m: m.pop(key)


def _unlist_artifact(m):
    m["files"].pop(m["artifacts"][0]["path"])


def _set(path, value):
    def edit(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


@pytest.mark.parametrize("case, edit, code, message", [
    ("path outside", _set(("artifacts", 0, "path"), "../outside.onnx"), 3, "leaves the bundle"),
    ("absolute path", _set(("reference", "inputs"), "/etc/passwd"), 3, "is an absolute path"),
    ("missing files", _drop("files"), 3, "files: Field required"),
    ("unlisted artifact", _unlist_artifact, 3, "is not listed in 'files'"),
    ("unknown precision", _set(("precision",), "int4"), 3, "precision: Input should be"),
    ("empty artifacts", _set(("artifacts",), []), 3, "artifacts: List should have at least 1 item"),
    ("unknown schema", _set(("schema",), "sfedge-bundle/99"), 3, "has schema 'sfedge-bundle/99'"),
    ("artifact sha256", _set(("artifacts", 0, "sha256"), "0" * 64), 3, "differ from its 'files' entry"),
    ("looser tolerance", _set(("target", "tolerances"), {"fp32": {"relative_max_abs": 1e9, "cosine": 0.0}}), 1,
     "looser tolerance than target sec-small installed here: relative_max_abs 1e+09 where 0.0001 is required"),
    ("dropped tolerance key", _set(("target", "tolerances"), {"fp32": {"cosine": 0.99999}}), 1,
     "it drops relative_max_abs"),
])
def test_crafted_manifests_fail_verify_with_their_exit_code(world, tmp_path, case, edit, code, message) -> None:
    bundle = copy_bundle(world, tmp_path / "bundle")
    (bundle / "manifest.json.sig").unlink()
    edit_manifest(bundle, edit)
    rc, out, err = cli("verify", str(bundle), cwd=tmp_path, env=world["env"])
    assert rc == code, out + err
    if code == 3:
        assert message in error_line(err, "verify")
    else:
        assert message in " ".join(err.split()) and "FAIL" in out


def test_malformed_files_symlinks_and_oversized_manifests_exit_3(world, tmp_path) -> None:
    outside = tmp_path / "outside.npy"
    cases = {}
    b = cases["symlink out"] = copy_bundle(world, tmp_path / "symlink")
    shutil.copy(b / "holdout_inputs.npy", outside)  # same bytes: only the link itself gives it away
    (b / "holdout_inputs.npy").unlink()
    (b / "holdout_inputs.npy").symlink_to(outside)
    b = cases["oversized"] = copy_bundle(world, tmp_path / "big")
    edit_manifest(b, _set(("padding",), "x" * (5 << 20)))
    b = cases["NaN"] = copy_bundle(world, tmp_path / "nan")
    (b / "manifest.json").write_text((b / "manifest.json").read_text().replace('"threads": 1', '"threads": NaN'))
    b = cases["duplicate key"] = copy_bundle(world, tmp_path / "dup")
    (b / "manifest.json").write_text('{"schema": "sfedge-bundle/1", "schema": "x"}')
    b = cases["no manifest"] = copy_bundle(world, tmp_path / "none")
    (b / "manifest.json").unlink()
    expected = {"symlink out": "resolves outside", "oversized": "over the 4,194,304-byte limit",
                "NaN": "NaN is not valid JSON", "duplicate key": "duplicate key 'schema'", "no manifest": "no manifest"}
    for case, bundle in cases.items():
        rc, out, err = cli("verify", str(bundle), cwd=tmp_path, env=world["env"])
        assert rc == 3, (case, out, err)
        assert expected[case] in error_line(err, "verify"), case
    rc, out, _ = cli("verify", "--help", cwd=tmp_path)
    assert all(f"  {c}  " in out for c in "0123") and "not a readable, well-formed bundle" in out


def test_tolerance_comes_from_the_installed_target_not_the_manifest(world, tmp_path) -> None:
    strict = tmp_path / "strict-targets"
    strict.mkdir()
    (strict / "sec-small.toml").write_text(TARGET.format(extra="[tolerances.fp32]\nmax_abs = 1e-12"))
    rc, out, err = cli("verify", str(world["bundle"]), "--json", cwd=tmp_path, env={"SFEDGE_TARGETS": str(strict)})
    report = json.loads(out)
    assert rc == 1 and report["tolerance"]["applied"]["max_abs"] == 1e-12
    assert report["artifacts"][0]["status"] == "fail" and "> 1e-12" in report["artifacts"][0]["reason"]
    # Not installed here: sfedge's defaults apply, and the report says so.
    rc, out, err = cli("verify", str(world["bundle"]), "--json", cwd=tmp_path, env={"SFEDGE_TARGETS": ""})
    report = json.loads(out)
    assert rc == 0 and "not installed here" in report["tolerance"]["source"], err


# -- 4. authenticity ------------------------------------------------------------------------------------------------
def test_signed_bundle_verifies_and_changed_or_unsigned_ones_fail(world, tmp_path) -> None:
    signers = str(world["keys"] / "allowed_signers")
    rc, out, err = cli("verify", str(world["bundle"]), "--allowed-signers", signers, cwd=tmp_path, env=world["env"])
    assert rc == 0 and "signature: valid, by builder@example" in out, out + err
    # A forger changes the reference outputs and re-hashes the manifest: hashes agree, the signature does not.
    changed = copy_bundle(world, tmp_path / "changed")
    with open(changed / "holdout_reference.npy", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(1.0).tobytes())
    edit_manifest(changed, lambda m: None, rehash=("holdout_reference.npy",))
    rc, out, err = cli("verify", str(changed), "--files-only", cwd=tmp_path, env=world["env"])
    assert rc == 0, "without signers, the re-hashed bundle is consistent: hashes prove no more"
    rc, out, err = cli("verify", str(changed), "--allowed-signers", signers, cwd=tmp_path, env=world["env"])
    assert rc == 1 and "signature invalid" in err and "incorrect signature" in err
    # Signed by a key that is not allowed.
    other = copy_bundle(world, tmp_path / "other")
    from sfedge.signing import sign_bytes

    (other / "manifest.json.sig").write_bytes(sign_bytes((other / "manifest.json").read_bytes(),
                                                         world["keys"] / "stranger"))
    rc, out, err = cli("verify", str(other), "--allowed-signers", signers, cwd=tmp_path, env=world["env"])
    assert rc == 1 and "not in" in err
    # Unsigned: fails when signers are given, and where the installed target requires a signature.
    unsigned = copy_bundle(world, tmp_path / "unsigned")
    (unsigned / "manifest.json.sig").unlink()
    rc, out, err = cli("verify", str(unsigned), "--allowed-signers", signers, cwd=tmp_path, env=world["env"])
    assert rc == 1 and "signature unsigned" in err
    rc, out, _ = cli("verify", str(unsigned), cwd=tmp_path, env=world["env"])
    assert rc == 0 and "not signed" in out
    strict = tmp_path / "signed-targets"
    strict.mkdir()
    (strict / "sec-small.toml").write_text(TARGET.format(extra=f'require_signature = true\nallowed_signers = "{signers}"'))
    rc, out, err = cli("verify", str(unsigned), cwd=tmp_path, env={"SFEDGE_TARGETS": str(strict)})
    assert rc == 1 and "signature unsigned" in err
    rc, out, err = cli("verify", str(world["bundle"]), cwd=tmp_path, env={"SFEDGE_TARGETS": str(strict)})
    assert rc == 0 and "valid, by builder@example" in out, out + err


# -- 5. the on-device build checks before it trusts -------------------------------------------------------------------
@pytest.fixture(scope="module")
def jetson_bundle(world) -> Path:
    """A signed sec-jetson fp32 bundle: its TensorRT device folder, no engine (no TensorRT here)."""
    root = world["root"]
    rc, out, err = cli("build", str(world["ckpt"]), "-t", "sec-jetson", "-o", str(root / "jetson"), "--sign",
                       str(world["keys"] / "builder"), "--json", cwd=root, env=world["env"])
    assert rc == 0, err
    path = Path(json.loads(out)["bundles"][0]["bundle"])
    return path if path.is_absolute() else root / path


def fake_tensorrt_env(world: dict) -> dict:
    pythonpath = os.pathsep.join(p for p in (str(HERE / "fake_tensorrt"), os.environ.get("PYTHONPATH")) if p)
    return {**world["env"], "PYTHONPATH": pythonpath, "SFEDGE_FAKE_TENSORRT": "1",
            "SFEDGE_CACHE": str(world["root"] / "engine-cache")}


def test_on_device_build_refuses_a_changed_bundle_and_confines_its_paths(world, jetson_bundle, tmp_path) -> None:
    env = fake_tensorrt_env(world)
    folder = next(p for p in jetson_bundle.iterdir() if p.is_dir())
    # A file planted in the device folder (the README says to run `sfedge build ..` from there).
    planted = copy_bundle({"bundle": jetson_bundle}, tmp_path / "planted")
    (planted / folder.name / "ctypes.py").write_text("raise SystemExit(9)\n")
    rc, _, err = cli("build", ".", cwd=planted, env=env)
    assert rc == 2 and "does not verify, so the on-device engine build refuses it" in error_line(err, "build")
    assert "not in the manifest" in err and not (planted / folder.name / "model.engine").exists()
    # A changed reference file.
    changed = copy_bundle({"bundle": jetson_bundle}, tmp_path / "changed")
    with open(changed / "holdout_reference.npy", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    rc, _, err = cli("build", str(changed), cwd=tmp_path, env=env)
    assert rc == 2 and "changed: holdout_reference.npy" in error_line(err, "build")
    # A forged build.json (re-hashed in the manifest) that writes the engine outside the bundle.
    forged = copy_bundle({"bundle": jetson_bundle}, tmp_path / "forged")
    plan_rel = f"{folder.name}/build.json"
    plan = json.loads((forged / plan_rel).read_text())
    plan["engine"] = "../../escaped.engine"
    (forged / plan_rel).write_text(json.dumps(plan))
    (forged / "manifest.json.sig").unlink()
    edit_manifest(forged, lambda m: None, rehash=(plan_rel,))
    rc, _, err = cli("build", str(forged), cwd=tmp_path, env=env)
    assert rc == 3 and "build.json 'engine'" in error_line(err, "build")
    assert not (tmp_path / "escaped.engine").exists()
    # Signature required but missing.
    rc, _, err = cli("build", str(forged), "--allowed-signers", str(world["keys"] / "allowed_signers"), cwd=tmp_path,
                     env=env)
    assert rc == 2 and "signature unsigned" in error_line(err, "build")


def test_on_device_build_adds_the_engine_and_nothing_else(world, jetson_bundle, tmp_path) -> None:
    env = fake_tensorrt_env(world)
    signers = str(world["keys"] / "allowed_signers")
    rc, out, err = cli("verify", str(jetson_bundle), cwd=tmp_path, env=env)
    assert rc == 1 and "nothing was checked" in " ".join(err.split())
    rc, out, err = cli("verify", str(jetson_bundle), "--files-only", "--allowed-signers", signers, cwd=tmp_path, env=env)
    assert rc == 0, out + err
    bundle = copy_bundle({"bundle": jetson_bundle}, tmp_path / "bundle")
    before = json.loads((bundle / "manifest.json").read_text())
    rc, out, err = cli("build", str(bundle), "--allowed-signers", signers, cwd=tmp_path, env=env)
    assert rc == 0 and "built model.engine" in out, out + err
    after = json.loads((bundle / "manifest.json").read_text())
    assert (bundle / "manifest.origin.json").read_text() == json.dumps(before, indent=2) + "\n"
    assert after["artifacts"][:-1] == before["artifacts"] and after["artifacts"][-1]["kind"] == "engine"
    added = set(after["files"]) - set(before["files"])
    assert added == set(after["device_build"]["added"]) and all("/" in a for a in added)
    assert {Path(a).name for a in added} == {"model.engine", "timing.cache"}
    rc, out, err = cli("verify", str(bundle), "--allowed-signers", signers, cwd=tmp_path, env=env)
    assert rc == 0 and "covers manifest.origin.json" in out and " pass " in out, out + err
    # The device may add the engine; nothing may be slipped in beside it.
    edit_manifest(bundle, lambda m: m["files"].update({"extra.py": m["files"]["holdout_inputs.npy"]}))
    shutil.copy(bundle / "holdout_inputs.npy", bundle / "extra.py")
    rc, out, err = cli("verify", str(bundle), "--allowed-signers", signers, cwd=tmp_path, env=env)
    assert rc == 1 and "extra.py was added after the build outside the device folder" in " ".join(err.split())


# -- 6. cache keys and inputs -----------------------------------------------------------------------------------------
def test_build_cache_distrusts_a_manifest_that_does_not_hash_its_artifact(world, tmp_path) -> None:
    from sfedge.build import _up_to_date

    bundle = copy_bundle(world, tmp_path / "ok" / world["bundle"].name)
    key = json.loads((bundle / "manifest.json").read_text())["build_key"]
    assert _up_to_date(bundle, key, None) is not None
    unlisted = copy_bundle(world, tmp_path / "unlisted" / world["bundle"].name)
    edit_manifest(unlisted, _unlist_artifact)
    assert _up_to_date(unlisted, key, None) is None, "a manifest that does not hash its artifact is not up to date"
    truncated = copy_bundle(world, tmp_path / "truncated" / world["bundle"].name)
    art = truncated / json.loads((truncated / "manifest.json").read_text())["artifacts"][0]["path"]
    art.write_bytes(art.read_bytes()[:100])
    assert _up_to_date(truncated, key, None) is None
    # A missing artifact makes `sfedge build` rebuild: see the killed/concurrent builds test below.


def test_build_key_covers_sfedge_code(tmp_path) -> None:
    import sfedge
    from sfedge.fileio import sfedge_code_sha256

    digest = sfedge_code_sha256()
    src = Path(sfedge.__file__).resolve().parent.parent
    scratch = tmp_path / "copy"
    shutil.copytree(src / "sfedge", scratch / "sfedge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("targets", "calibration", "pyproject.toml"):
        if (src / name).is_dir():
            shutil.copytree(src / name, scratch / name)
        elif (src / name).is_file():
            shutil.copy(src / name, scratch / name)
    code = "from sfedge.fileio import sfedge_code_sha256 as f; print(f())"

    def digest_of(root: Path) -> str:
        p = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(root)})
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    assert digest_of(scratch) == digest  # the same code, elsewhere: the same key
    with open(scratch / "sfedge" / "parity.py", "a") as f:
        f.write("\n")  # one more byte of code, same version string
    assert digest_of(scratch) != digest


def test_remote_host_starting_with_dash_is_refused_before_ssh_runs(world, tmp_path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "ssh-argv.json"
    for tool in ("ssh", "scp"):
        (fake / tool).write_text(f"#!{sys.executable}\nimport json, sys\n"
                                 f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\nsys.exit(255)\n")
        (fake / tool).chmod(0o755)
    env = {**world["env"], "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    marker = tmp_path / "PROXY-COMMAND-RAN"
    rc, _, err = cli("profile", str(world["bundle"]), f"--remote=-oProxyCommand=touch {marker}", "-o",
                     str(tmp_path / "r"), cwd=tmp_path, env=env)
    assert rc == 2 and "is not a host name" in error_line(err, "profile")
    assert not log.exists() and not marker.exists()
    # A bundle holding a symlink out of it is not copied (scp -r would follow it).
    linked = copy_bundle(world, tmp_path / "linked")
    (linked / "keys").symlink_to(world["keys"])
    rc, _, err = cli("profile", str(linked), "--remote", "pi@device", "-o", str(tmp_path / "r"), cwd=tmp_path, env=env)
    assert rc == 2 and "holds a symlink, keys" in error_line(err, "profile") and not log.exists()
    # A normal host reaches ssh with `--` before it.
    rc, _, err = cli("profile", str(world["bundle"]), "--remote", "pi@device", "-o", str(tmp_path / "r"),
                     cwd=tmp_path, env=env)
    argv = json.loads(log.read_text().splitlines()[0])
    assert rc == 2 and argv[argv.index("pi@device") - 1] == "--"


def test_target_names_are_a_safe_set_and_scripts_quote_what_they_embed(world, tmp_path) -> None:
    evil = tmp_path / "a\ntouch x.toml"
    evil.write_text(TARGET.replace('name = "sec-small"', 'name = "a\\ntouch x"').format(extra=""))
    rc, _, err = cli("targets", str(evil), cwd=tmp_path)
    assert rc == 2 and "bad target name" in error_line(err, "targets")
    from sfedge.backends.tensorrt.commands import trtexec_command, write_build_script

    cmd = trtexec_command("m; rm -rf ~.onnx", "model.engine", tensorrt_version="10.3", precision="fp32")
    script = write_build_script(tmp_path / "build.sh", cmd, tensorrt_version="10.3", title="model\nrm -rf ~ #")
    lines = script.read_text().splitlines()
    assert not any(ln.startswith("rm ") for ln in lines)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert "'--onnx=m; rm -rf ~.onnx'" in script.read_text()


@pytest.mark.parametrize("case, make, message", [
    ("decompression bomb", "bomb", "is 9500x9500 pixels, over the 40,000,000-pixel limit"),
    ("NaN", np.array([[0.5, np.nan]], np.float32), "has NaN or infinite values"),
    ("inf", np.array([[0.5, np.inf]], np.float32), "has NaN or infinite values"),
    ("signed integers", np.zeros((8, 8), np.int16), "has dtype int16"),
    ("out of range", np.full((8, 8), 3.0, np.float32), "outside [0, 1]"),
])
def test_calibration_inputs_are_checked_before_use(tmp_path, case, make, message) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(folder / "good.png")
    if isinstance(make, str):
        bad = folder / "bomb.png"
        Image.new("L", (9500, 9500)).save(bad, optimize=True)
        assert bad.stat().st_size < 200_000
    else:
        bad = folder / "bad.npy"
        np.save(bad, make)
    spec = tmp_path / "set.toml"
    spec.write_text('name = "set"\n[source]\nfolder = "images"\n[preprocessing]\nchannels = 1\nmean = [0.5]\n'
                    'std = [0.25]\n[sampling]\ncount = 4\nholdout = 1\n')
    start = time.perf_counter()
    rc, _, err = cli("calibration", str(spec), "--size", "16", "16", cwd=tmp_path)
    assert rc == 2 and message in error_line(err, "calibration") and str(bad) in err
    assert time.perf_counter() - start < 30


# -- 7. atomic and concurrent-safe writes -----------------------------------------------------------------------------
def test_replacing_a_folder_never_leaves_a_moment_without_one(tmp_path) -> None:
    from sfedge.fileio import atomic_dir

    dest, stop = tmp_path / "out", tmp_path / "stop"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("0")
    # Another process (another core) looks for the folder as fast as it can while it is replaced 60 times.  With
    # the old rename-away-then-rename-in it saw the folder missing hundreds of times per run.
    watcher = subprocess.Popen([sys.executable, "-c", f"""
import os
p, stop, seen, missing = {str(dest / "a.txt")!r}, {str(stop)!r}, 0, 0
while not os.path.exists(stop):
    seen += 1
    missing += not os.path.exists(p)
print(seen, missing)
"""], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    try:
        for i in range(1, 61):
            with atomic_dir(dest) as tmp:
                (tmp / "a.txt").write_text(str(i))
    finally:
        stop.touch()
        seen, missing = map(int, watcher.communicate(timeout=60)[0].split())
    assert (dest / "a.txt").read_text() == "60"
    assert seen > 1000 and missing == 0, f"the folder was missing {missing} of {seen} times while being replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stop"]  # no .part, .old or lock file left


@pytest.mark.slow
def test_missing_artifact_killed_terminated_and_concurrent_builds(world, tmp_path) -> None:
    out = tmp_path / "bundles"
    argv = [sys.executable, "-P", "-m", "sfedge.cli", "build", str(world["ckpt"]), "-t", "sec-small", "-o", str(out)]
    env = {**os.environ, **world["env"]}

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([*argv, *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def parts() -> list[str]:
        return [p.name for p in out.iterdir() if p.name.endswith(".part")] if out.exists() else []

    def wait_for_part(proc: subprocess.Popen) -> None:
        deadline = time.time() + 300
        while not parts() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert parts(), "the build never started writing"

    # The bundle is there, but its artifact is missing: the cache must not call it up to date.
    bundle = copy_bundle(world, out / world["bundle"].name)
    (bundle / json.loads((bundle / "manifest.json").read_text())["artifacts"][0]["path"]).unlink()
    killed = start()
    wait_for_part(killed)
    killed.kill()  # kill -9: nothing runs on the way out
    killed.communicate()
    assert parts(), "kill -9 should leave its .part folder behind"
    a, b = start("--json"), start("--json")
    results = [p.communicate(timeout=900) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, results
    cached = sorted(json.loads(o)["bundles"][0]["cached"] for o, _ in results)
    assert cached == [False, True], "one build rebuilds the missing artifact, the other waits, then finds it done"
    assert not parts()
    manifest = (bundle / "manifest.json").read_bytes()
    term = start("--force")
    wait_for_part(term)
    term.send_signal(signal.SIGTERM)
    _, err = term.communicate(timeout=120)
    assert term.returncode == 128 + signal.SIGTERM and "terminated; nothing half-written" in err, err
    assert not parts() and (bundle / "manifest.json").read_bytes() == manifest
    rc, out_, err = cli("verify", str(bundle), cwd=tmp_path, env=world["env"])
    assert rc == 0, out_ + err
