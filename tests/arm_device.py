"""An ARM device in a box: a Debian arm64 userland under QEMU user mode, with OpenSSH's sshd on localhost.

Test infrastructure (like tests/localhost_sshd.py), driven by ``make arm-device``,
``make arm-device-stop`` and ``make test-arm``:

    python tests/arm_device.py start [--target raspberry-pi-5 | --cpu cortex-a76]
    python tests/arm_device.py status [--json]
    python tests/arm_device.py stop

``start`` needs root on an x86-64 Linux host.  It installs what it needs
(``apt-get install qemu-user-static mmdebstrap``), mounts binfmt_misc and
registers QEMU's aarch64 interpreter, so aarch64 binaries run on this machine.
The first start extracts Debian bookworm arm64 (python3, venv, openssh-server;
Debian's own arm64 packages, maintainer scripts replaced by
:func:`configure_root`), creates a venv at /opt/sfedge holding the runtime-only
dependencies of this checkout (``sfedge[runtime]``: the aarch64 wheels of
numpy, onnxruntime, ai-edge-litert; no torch) and a venv with only pip at
/root/venv-bare for the ``--install`` path, and caches the result as a tarball
under .cache/arm-device (keyed by everything that goes into it).  Every start
unpacks a fresh root from that tarball, has the device's pip install a wheel of
the working tree into /opt/sfedge, makes a client key and runs sshd on a free
127.0.0.1 port, with ``QEMU_CPU`` set to the target's core where QEMU has it
(every process of an SSH session runs on that emulated CPU).

/proc and /dev are bind-mounted into the root, never /sys: onnxruntime's
cpuinfo reads the host's x86 topology there and segfaults at import.  The
root's /sys holds only the list of CPUs (:func:`write_cpu_list`): without it
cpuinfo fails to initialize and LiteRT silently runs without XNNPACK.

When the machine cannot do it (not root, no binfmt_misc, no apt), ``start``
exits 3 and writes the reason to .cache/arm-device/unavailable; the tests that
need the device skip with that reason.  ``stop`` ends sshd and every process
still running inside the root (found by their /proc/PID/root), unmounts, and
deletes the unpacked root; the cached tarball stays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".cache" / "arm-device"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# The root is extracted, not installed (mmdebstrap --variant=extract): maintainer scripts under emulation take
# minutes (debootstrap: 4.5-9 min here), and configure_root() does the little of them Python and sshd need.
ESSENTIAL = ("base-files", "base-passwd", "bash", "dash", "coreutils", "findutils", "grep", "sed", "tar", "gzip",
             "libc-bin", "mawk", "debianutils", "libstdc++6", "libgcc-s1")
DEB_PACKAGES = ("python3", "python3-venv", "openssh-server", "openssh-sftp-server", "ca-certificates")
DEVICE_PYTHON = "3.11"  # bookworm's
# Wheel tags the device takes: bookworm's glibc is 2.36 (pip expands none of these by itself for --platform).
PLATFORMS = [a for v in range(36, 16, -1) for a in ("--platform", f"manylinux_2_{v}_aarch64")] + [
    "--platform", "manylinux2014_aarch64", "--platform", "linux_aarch64"]
VENV = "/opt/sfedge"  # the runtime-only install of this checkout
BARE_VENV = "/root/venv-bare"  # a Python with nothing installed: what `sfedge profile --install` meets
HOST_PACKAGES = ("qemu-user-static", "mmdebstrap")
QEMU_STATIC = "/usr/bin/qemu-aarch64-static"
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
DEFAULT_CPU = "cortex-a76"  # Raspberry Pi 5's core: ARMv8.2-A with fp16 arithmetic and dot product
UNAVAILABLE_EXIT = 3
RECIPE_VERSION = "1"  # bump when the way the root is built changes


class Unavailable(Exception):
    """This machine cannot run the emulated device (the reason is for people and for pytest's skip)."""


def log(msg: str) -> None:
    print(f"arm-device: {msg}", file=sys.stderr, flush=True)


def state_dir() -> Path:
    return Path(os.environ.get("SFEDGE_ARM_DEVICE_DIR", DEFAULT_DIR))


def run(argv: list[str], what: str, timeout: float | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its last lines of output."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return p


# -- the host: root, QEMU, binfmt_misc -------------------------------------------------------------------------

def ensure_host() -> None:
    """Install QEMU and debootstrap if missing and make aarch64 binaries run here (Unavailable when impossible)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise Unavailable(f"the emulated ARM device needs an x86-64 Linux host, this is {sys.platform}/{platform.machine()}")
    if os.geteuid() != 0:
        raise Unavailable("the emulated ARM device needs root (apt-get, mount, chroot); run as root")
    if not (Path(QEMU_STATIC).exists() and shutil.which("mmdebstrap") and BINFMT_CONF.exists()):
        if not shutil.which("apt-get"):
            raise Unavailable("qemu-user-static and mmdebstrap are missing and there is no apt-get to install them")
        log("installing qemu-user-static and mmdebstrap (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", *HOST_PACKAGES]
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            run(["apt-get", "update", "-q"], "apt-get update", env=env)
            run(install, f"apt-get install {' '.join(HOST_PACKAGES)}", env=env)
    if not (BINFMT_DIR / "register").exists():
        p = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True, text=True)
        if p.returncode != 0 or not (BINFMT_DIR / "register").exists():
            raise Unavailable(f"binfmt_misc cannot be mounted here ({(p.stderr.strip() or 'no register file')}); "
                              "a container needs --privileged for it")
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists():
        try:
            (BINFMT_DIR / "register").write_text(BINFMT_CONF.read_text().strip())
        except OSError as e:
            raise Unavailable(f"registering QEMU's aarch64 interpreter with binfmt_misc failed ({e})") from None
    if entry.read_text().splitlines()[0] != "enabled":
        raise Unavailable(f"{entry} is registered but disabled (echo 1 > {entry})")


def binfmt_interpreter() -> str:
    """The interpreter binfmt_misc runs for aarch64 binaries (copied into the root unless registered with F)."""
    for line in (BINFMT_DIR / "qemu-aarch64").read_text().splitlines():
        if line.startswith("interpreter "):
            return line.split(None, 1)[1]
    raise RuntimeError("binfmt_misc's qemu-aarch64 entry names no interpreter")


def qemu_cpus() -> list[str]:
    p = subprocess.run([QEMU_STATIC, "-cpu", "help"], capture_output=True, text=True)
    return [ln.strip() for ln in p.stdout.splitlines()[1:] if ln.strip()]


def cpu_for(target: str | None, cpu: str | None) -> tuple[str, str]:
    """(QEMU CPU model, why): --cpu as given, else the target's core where QEMU has it, else Cortex-A76."""
    models = qemu_cpus()
    if cpu:
        if cpu not in models:
            raise SystemExit(f"arm-device: QEMU has no CPU model '{cpu}' (it has: {', '.join(models)})")
        return cpu, "asked for"
    if target:
        sys.path.insert(0, str(REPO))
        from sfedge.targets import load_target

        t = load_target(target)
        text = f"{t.device.get('cpu', '')} {t.description}".lower()
        for m in models:
            if m.startswith(("cortex-", "neoverse-")) and m in text:
                return m, f"{t.name}'s core"
        if t.device.get("fp16_arithmetic"):
            return DEFAULT_CPU, f"closest QEMU core to {t.name}'s (ARMv8.2-A with fp16 arithmetic and dot product)"
        return "cortex-a72", f"closest QEMU core to {t.name}'s (ARMv8.0-A, no fp16 arithmetic)"
    return DEFAULT_CPU, "default (raspberry-pi-5's core)"


# -- building the root ------------------------------------------------------------------------------------------

def runtime_requirements() -> list[str]:
    """The runtime-only install's requirements, read from pyproject.toml (core dependencies + the runtime extra)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["runtime"])


def base_key() -> str:
    payload = json.dumps([RECIPE_VERSION, SUITE, MIRROR, ESSENTIAL, DEB_PACKAGES, runtime_requirements()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_wheel(out: Path) -> Path:
    """A wheel of this working tree (pure Python, built here, installed on the device)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("sfedge-*.whl"):
        old.unlink()
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        "building the sfedge wheel", cwd=out)
    return next(out.glob("sfedge-*.whl"))


def write_cpu_list(root: Path) -> None:
    """The two sysfs files that say which CPUs exist, as the kernel's sysfs says on any device.

    cpuinfo (inside XNNPACK and onnxruntime) reads them first; without them it fails to initialize, and
    then LiteRT creates no XNNPACK delegate at all (TFLite's own kernels run instead, in fp32) and onnxruntime
    detects no CPU features.  The host's /sys is not bound instead: its x86 topology makes onnxruntime crash.
    """
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(f"0-{(os.cpu_count() or 1) - 1}\n")


def mount_root(root: Path) -> None:
    """Bind /proc and /dev (recursively, so /dev/pts and /dev/shm come along) into the root; never /sys."""
    for sub in ("proc", "dev"):
        target = root / sub
        target.mkdir(exist_ok=True)
        if not is_mounted(target):
            run(["mount", "--rbind", f"/{sub}", str(target)], f"binding /{sub} into the root")
            run(["mount", "--make-rslave", str(target)], f"making {target} a slave mount")


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mnt = line.split()[1].replace("\\040", " ")
        if mnt.startswith(prefix):
            out.append(mnt)
    return out


def is_mounted(path: Path) -> bool:
    p = str(path.resolve())
    return any(line.split()[1] == p for line in Path("/proc/self/mounts").read_text().splitlines())


def unmount_root(root: Path) -> None:
    """Unmount everything under the root (deepest first; lazily when busy). Raises when something stays mounted."""
    for _ in range(3):
        left = sorted(mounts_under(root), key=len, reverse=True)
        if not left:
            return
        for mnt in left:
            if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        time.sleep(0.2)
    if mounts_under(root):
        raise RuntimeError(f"still mounted under {root}: {mounts_under(root)}; unmount them by hand before deleting it")


def remove_root(root: Path) -> None:
    """Delete an unpacked root, but only once nothing is mounted under it (a bound /dev must never be deleted)."""
    if not root.exists():
        return
    unmount_root(root)
    run(["rm", "-rf", "--one-file-system", str(root)], f"removing {root}")


def chroot(root: Path, *argv: str, what: str, env: dict[str, str] | None = None, timeout: float | None = 1800) -> str:
    base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    return run(["chroot", str(root), *argv], what, timeout=timeout, env={**base, **(env or {})}).stdout


def copy_host_network_config(root: Path) -> None:
    """The host's resolver and CA bundle (the registries may sit behind a TLS proxy) and a pip.conf pointing at it."""
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    bundle = next((p for p in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt") if p and Path(p).is_file()),
                  None)
    if bundle:
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        dest = root / "etc/ssl/certs/ca-certificates.crt"
        dest.unlink(missing_ok=True)
        shutil.copyfile(bundle, dest)
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ntimeout = 180\n"
                                       "disable-pip-version-check = true\n")


def host_pip_install(site: Path, requirements: list[str], what: str) -> None:
    """Install aarch64 wheels of ``requirements`` into the device venv's ``site`` with this machine's pip.

    Native pip resolving for the device's platform (manylinux aarch64, CPython 3.11) takes seconds where the
    emulated pip takes minutes; the device's own pip is still what installs sfedge (every start) and what the
    ``--install`` path uses.
    """
    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
         "--only-binary=:all:", *PLATFORMS, "--implementation", "cp",
         "--python-version", DEVICE_PYTHON, "--abi", f"cp{DEVICE_PYTHON.replace('.', '')}", "--target", str(site),
         *requirements], what, timeout=1800)


def compile_python(root: Path, *folders: str) -> None:
    """Byte-compile the device's Python files here, natively (a .pyc is the same on every CPU for one Python
    version), so the emulated Python neither compiles them at install nor at every import."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" != DEVICE_PYTHON:
        return  # another Python's .pyc would be ignored there; the device compiles on first import instead
    dirs = [str(root / f.lstrip("/")) for f in folders]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "2", "-s", str(root), "-p", "/", *dirs],
                   capture_output=True)  # a few stdlib test files do not compile by design; that is fine


def configure_root(root: Path) -> None:
    """What the packages' maintainer scripts would do, as far as Python and sshd need it (they are not run:
    under emulation they take minutes): users and groups, the dynamic linker's cache, SSH host keys."""
    share = root / "usr/share/base-passwd"
    (root / "etc/passwd").write_text((share / "passwd.master").read_text()
                                     + "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n")
    (root / "etc/group").write_text((share / "group.master").read_text())
    (root / "etc/hostname").write_text("sfedge-arm-device\n")
    (root / "root").mkdir(mode=0o700, exist_ok=True)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (root / "run/sshd").mkdir(parents=True, exist_ok=True)
    chroot(root, "/sbin/ldconfig", what="ldconfig")
    run(["ssh-keygen", "-A", "-f", str(root)], "generating SSH host keys")


def build_base(tarball: Path, work: Path) -> dict[str, Any]:
    """Debian arm64 + venvs + the runtime-only dependencies, packed into ``tarball``; returns timings."""
    root = work / "build-root"
    remove_root(root)
    timings: dict[str, float] = {}
    t = time.monotonic()
    packages = [*ESSENTIAL, *DEB_PACKAGES]
    log(f"mmdebstrap {SUITE} arm64: {', '.join(DEB_PACKAGES)} and what they need")
    run(["mmdebstrap", "--mode=root", "--variant=extract", "--arch=arm64", f"--include={','.join(packages)}", SUITE,
         str(root), MIRROR], "mmdebstrap", timeout=1800)
    timings["debian_s"] = round(time.monotonic() - t, 1)
    try:
        interp = binfmt_interpreter()
        (root / interp.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(interp, root / interp.lstrip("/"))  # for binfmt entries registered without the F flag
        configure_root(root)
        copy_host_network_config(root)
        t = time.monotonic()
        log(f"venvs {VENV} (runtime-only dependencies of this checkout) and {BARE_VENV} (pip only)")
        for venv in (VENV, BARE_VENV):
            chroot(root, "python3", "-m", "venv", "--without-pip", venv, what=f"creating {venv}")
        site = f"lib/python{DEVICE_PYTHON}/site-packages"
        host_pip_install(root / VENV.lstrip("/") / site, ["pip", *runtime_requirements()], "pip (aarch64 wheels)")
        host_pip_install(root / BARE_VENV.lstrip("/") / site, ["pip"], "pip into the bare venv")
        timings["venv_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        compile_python(root, f"/usr/lib/python{DEVICE_PYTHON}", VENV, BARE_VENV)
        timings["compile_s"] = round(time.monotonic() - t, 1)
    except BaseException:
        remove_root(root)
        raise
    t = time.monotonic()
    part = tarball.with_suffix(".tar.part")
    with tarfile.open(part, "w") as tar:
        tar.add(root, arcname=".")
    part.replace(tarball)
    timings["pack_s"] = round(time.monotonic() - t, 1)
    remove_root(root)
    return timings


# -- start / stop / status -------------------------------------------------------------------------------------

def installed_packages(venv: Path) -> dict[str, str]:
    """{distribution: version} of a venv, read from its dist-info folders."""
    out = {}
    for info in sorted(venv.glob(f"lib/python{DEVICE_PYTHON}/site-packages/*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        out[name] = version
    return out


def dir_bytes(folder: Path) -> int:
    return sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_argv(state: dict[str, Any]) -> list[str]:
    return ["ssh", "-p", str(state["port"]), "-i", state["key"], "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", f"{state['user']}@127.0.0.1"]


def ssh_ok(state: dict[str, Any], timeout: float = 60) -> bool:
    try:
        return subprocess.run([*ssh_argv(state), "true"], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def load_state() -> dict[str, Any] | None:
    f = state_dir() / "state.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def start(target: str | None, cpu: str | None) -> dict[str, Any]:
    """Bring the device up (building the cached root first when there is none); returns its state."""
    t0 = time.monotonic()
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "unavailable").unlink(missing_ok=True)
    state = load_state()
    if state and pid_alive(state["pid"]) and ssh_ok(state, timeout=30):
        log(f"already running: root@127.0.0.1 port {state['port']} (QEMU_CPU={state['cpu']})")
        return state
    stop(quiet=True)
    ensure_host()
    model, why = cpu_for(target, cpu)
    key = base_key()
    tarball = d / f"base-{key}.tar"
    setup: dict[str, Any] = {"from_cache": tarball.exists(), "base_key": key}
    if not tarball.exists():
        for old in d.glob("base-*.tar"):
            old.unlink()
        setup.update(build_base(tarball, d))
    root = d / "root"
    t = time.monotonic()
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="fully_trusted") if sys.version_info >= (3, 12) else tar.extractall(root)
    setup["unpack_s"] = round(time.monotonic() - t, 1)
    copy_host_network_config(root)
    write_cpu_list(root)
    mount_root(root)
    try:
        t = time.monotonic()
        wheel = build_wheel(d / "wheel")
        shutil.copy2(wheel, root / "tmp" / wheel.name)
        # The device's pip installs the wheel; its dependencies are in the cached venv (the cache key holds them).
        chroot(root, f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-compile", "--force-reinstall",
               "--no-deps", f"/tmp/{wheel.name}", what="installing the sfedge wheel")
        compile_python(root, f"{VENV}/lib/python{DEVICE_PYTHON}/site-packages/sfedge")
        setup["wheel_s"] = round(time.monotonic() - t, 1)
        setup["installed"] = installed_packages(root / VENV.lstrip("/"))
        setup["venv_bytes"] = dir_bytes(root / VENV.lstrip("/"))
        key_file = d / "client_key"
        for f in (key_file, key_file.with_suffix(".pub")):
            f.unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sfedge-arm-device", "-f", str(key_file)], "ssh-keygen")
        auth = root / "root/.ssh/authorized_keys"
        auth.parent.mkdir(mode=0o700, exist_ok=True)
        auth.write_text(key_file.with_suffix(".pub").read_text())
        auth.chmod(0o600)
        port = free_port()
        (root / "etc/ssh/sshd_config.sfedge").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPidFile /run/sshd.sfedge.pid\nPrintMotd no\n"
            f"SetEnv QEMU_CPU={model}\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
        (root / "run/sshd").mkdir(parents=True, exist_ok=True)
        logf = open(d / "sshd.log", "w")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": model, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config.sfedge"],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True)
        state = {"pid": proc.pid, "port": port, "user": "root", "key": str(key_file), "root": str(root), "cpu": model,
                 "cpu_why": why, "python": f"{VENV}/bin/python", "bare_python": f"{BARE_VENV}/bin/python",
                 "target": target}
        deadline = time.monotonic() + 120
        while not ssh_ok(state, timeout=30):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not come up: {(d / 'sshd.log').read_text()[-800:]}")
            time.sleep(0.5)
    except BaseException:
        stop(quiet=True)
        raise
    setup["start_s"] = round(time.monotonic() - t0, 1)
    state["setup"] = setup
    (d / "state.json").write_text(json.dumps(state, indent=1))
    (d / "setup.json").write_text(json.dumps(setup, indent=1))
    log(f"up in {setup['start_s']} s ({'from the cached root' if setup['from_cache'] else 'built from nothing'}): "
        f"ssh -p {port} -i {key_file} root@127.0.0.1  (QEMU_CPU={model}: {why})")
    return state


def processes_in(root: Path) -> list[int]:
    """PIDs of processes whose root directory is ``root`` (everything the device runs)."""
    want = str(root.resolve())
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "root") == want:
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def stop(quiet: bool = False) -> None:
    """End sshd and every process inside the root, unmount, delete the unpacked root (the cache stays)."""
    d = state_dir()
    state = load_state()
    root = Path(state["root"]) if state else d / "root"
    if state and pid_alive(state["pid"]):
        try:
            os.killpg(state["pid"], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    if root.exists():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = processes_in(root)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while processes_in(root) and time.monotonic() < deadline:
                time.sleep(0.1)
        remove_root(root)
    (d / "state.json").unlink(missing_ok=True)
    if not quiet:
        log("stopped" if state else "was not running")


def status() -> dict[str, Any]:
    d = state_dir()
    state = load_state() or {}
    reason = (d / "unavailable").read_text().strip() if (d / "unavailable").exists() else None
    running = bool(state) and pid_alive(state["pid"]) and ssh_ok(state, timeout=30)
    return {"running": running, "unavailable": reason, "cached": sorted(p.name for p in d.glob("base-*.tar")), **state}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="build (once) and start the device")
    s.add_argument("--target", help="pick QEMU's CPU model from this sfedge target (e.g. raspberry-pi-5)")
    s.add_argument("--cpu", help="QEMU CPU model (overrides --target), e.g. cortex-a76, cortex-a72, max")
    sub.add_parser("stop", help="stop the device and delete its unpacked root (the cache stays)")
    st = sub.add_parser("status", help="is it running, and how to reach it")
    st.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.cmd == "start":
        try:
            start(args.target, args.cpu)
        except Unavailable as e:
            state_dir().mkdir(parents=True, exist_ok=True)
            (state_dir() / "unavailable").write_text(str(e) + "\n")
            log(f"cannot run here: {e}")
            return UNAVAILABLE_EXIT
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"start failed: {e}")
            return 1
        return 0
    if args.cmd == "stop":
        stop()
        return 0
    info = status()
    if args.json:
        print(json.dumps(info, indent=1))
    elif info["running"]:
        print(f"running: ssh -p {info['port']} -i {info['key']} root@127.0.0.1 (QEMU_CPU={info['cpu']}), "
              f"python {info['python']}")
    else:
        print(f"not running{': ' + info['unavailable'] if info['unavailable'] else ''}")
    return 0 if info["running"] else 1


if __name__ == "__main__":
    sys.exit(main())
