"""Profile on remote devices over plain ssh/scp, several in parallel, and bring the reports back.

The system ``ssh`` and ``scp`` are used as they are, so the user's
``~/.ssh/config`` (aliases, ports, keys, jump hosts) applies; ``--ssh-option
KEY=VALUE`` adds ``-o KEY=VALUE`` to both.  For each host:

1. probe: which Python, whether sfedge, numpy, psutil, rich and the runtimes
   the bundles need import there (imported, not started: creating TensorRT
   objects on a GPU-less host can crash the process, importing it cannot);
2. if something is missing, stop with the exact pip command, or with
   ``install=True`` copy this sfedge over as a wheel and pip-install it with
   only the runtimes the bundles need;
3. copy the bundles, run ``sfedge profile`` there, copy the report folder back
   (plots are drawn here, so the device needs no matplotlib), clean up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sfedge
from sfedge import __version__
from sfedge.backends.registry import BACKENDS
from sfedge.errors import RemoteError
from sfedge.fileio import check_output_dir
from sfedge.isolation import neutral_cwd, python_argv
from sfedge.profile.report import OUTPUT_KIND, load_report
from sfedge.profile.subjects import subjects_from
from sfedge.profile.types import MeasureConfig
from sfedge.progress import Progress

__all__ = [
    "RemoteOptions", "RemoteResult", "Missing", "profile_remote", "probe_host", "missing_requirements", "PROBE",
    "SSHHost", "remote_bundles", "remote_names", "host_labels", "check_host", "check_no_links",
]

CORE_MODULES = ("numpy", "psutil", "rich")

# Runs on the remote with any Python >= 3.8; prints one JSON line.  It really imports the modules asked for (only
# the runtimes the bundles need): a wheel that is present but broken must count as missing.  Importing tensorrt
# is safe on a GPU-less host; constructing its objects is what crashes, and the probe constructs nothing.
PROBE = r"""
import importlib, json, platform, sys
def imports(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False
out = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
       "modules": {m: imports(m) for m in %s}}
try:
    import sfedge
    out["sfedge"] = sfedge.__version__
except Exception:
    out["sfedge"] = None
print(json.dumps(out))
"""


@dataclass
class RemoteOptions:
    """How to reach and use the remote hosts."""

    ssh_options: list[str] = field(default_factory=list)  # KEY=VALUE, passed as -o KEY=VALUE to ssh and scp
    ssh_config: str | None = None  # an ssh_config file instead of ~/.ssh/config (-F)
    python: str = "python3"
    install: bool = False
    keep: bool = False
    workdir: str = ".cache/sfedge-remote"  # relative to the remote home
    connect_timeout: int = 15

    def ssh_args(self) -> list[str]:
        """Arguments shared by ssh and scp; the user's options come first because ssh keeps the first value."""
        args = ["-F", str(self.ssh_config)] if self.ssh_config else []
        for opt in self.ssh_options:
            if "=" not in opt:
                raise RemoteError(f"--ssh-option {opt!r} is not KEY=VALUE", "e.g. --ssh-option Port=2222")
            args += ["-o", opt]
        return args + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", "-o", "LogLevel=ERROR"]


@dataclass
class RemoteResult:
    """One host's outcome: its local report folder, or the one-line error that stopped it."""

    host: str
    report_dir: Path | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    installed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def check_host(host: str) -> str:
    """``host`` if it can only be read as a host by ssh and scp; RemoteError otherwise.

    Why: a "host" starting with ``-`` (``-oProxyCommand=...``) is an ssh
    option, i.e. a command run on this machine; whitespace and control
    characters have no place in a host name either.  ``--`` also comes before
    the host in every ssh/scp call, but refusing early keeps ssh from ever
    seeing it.
    """
    if not host or host.startswith("-") or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in host):
        raise RemoteError(f"--remote {host!r} is not a host name",
                          "give USER@HOST or an alias from ~/.ssh/config (no leading '-', no spaces)")
    return host


def check_no_links(folder: Path) -> None:
    """RemoteError when ``folder`` holds a symlink or special file: a copy must never follow a link out of a bundle."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            mode = p.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                raise RemoteError(f"{folder} holds {kind}, {p.relative_to(folder)}; bundles hold regular files only",
                                  "remove it (or rebuild the bundle) before copying it to a device")


class SSHHost:
    """ssh/scp to one host with the shared options; every failure becomes a RemoteError naming the step.

    The host is checked (:func:`check_host`) and ``--`` precedes it in every
    call, so no host name can reach ssh or scp as an option.
    """

    def __init__(self, host: str, options: RemoteOptions) -> None:
        self.host, self.options = check_host(host), options
        self.args = options.ssh_args()

    def ssh(self, command: str, what: str, timeout: float | None = None, ok: Sequence[int] = (0,)) -> str:
        """Run ``command`` there; its stdout (a RemoteError naming ``what`` for exit codes not in ``ok``)."""
        return self._call(["ssh", *self.args, "--", self.host, command], what, timeout, ok)

    def put(self, local: Sequence[Path], remote: str, what: str) -> None:
        for p in local:
            check_no_links(Path(p))
        self._call(["scp", "-q", "-r", *self.args, "--", *(str(p) for p in local), f"{self.host}:{remote}"], what)

    def get(self, remote: str, local: Path, what: str) -> None:
        self._call(["scp", "-q", "-r", *self.args, "--", f"{self.host}:{remote}", str(local)], what)

    def _call(self, argv: list[str], what: str, timeout: float | None = None, ok: Sequence[int] = (0,)) -> str:
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as err:
            raise RemoteError(f"'{argv[0]}' is not installed here", "install the OpenSSH client (apt install openssh-client)") from err
        except subprocess.TimeoutExpired as err:
            raise RemoteError(f"{self.host}: {what} timed out after {timeout:.0f} s", "check the host is up") from err
        if p.returncode not in ok:
            lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
            detail = lines[-1] if lines else f"exit code {p.returncode}"
            hint = ("check `ssh HOST` works without a password prompt (keys, ~/.ssh/config, --ssh-option)"
                    if p.returncode == 255 else "run the same command with ssh by hand to see more")
            raise RemoteError(f"{self.host}: {what} failed: {detail}", hint)
        return p.stdout


def _remote_path_arg(path: str) -> str:
    """Shell-quote a remote path but keep a leading ~/ expandable."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def probe_host(host: str, options: RemoteOptions, backends: Sequence[str] = ()) -> dict[str, Any]:
    """What the remote Python can import: sfedge (and its version), the core modules, the runtimes of ``backends``."""
    modules = sorted({*CORE_MODULES, *(m for b in backends for m in BACKENDS[b].modules)})
    script = PROBE % json.dumps(modules)
    out = SSHHost(host, options).ssh(f"{_remote_path_arg(options.python)} -c {shlex.quote(script)}",
                                   f"probing {options.python}", timeout=120)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as err:
        raise RemoteError(f"{host}: the probe printed no JSON ({out.strip()[:120]!r})",
                          "check --remote-python runs a Python 3 interpreter") from err


@dataclass
class Missing:
    """What a probed host lacks for the backends it must run."""

    sfedge: bool = False  # not importable at all
    outdated: str | None = None  # the version there, when it differs from this one
    pip: list[str] = field(default_factory=list)  # pip requirements for missing core modules and runtimes
    blocking: list[str] = field(default_factory=list)  # problems pip cannot fix (TensorRT)

    def message(self, host: str, python: str) -> RemoteError:
        """The one-line error saying exactly what to install on ``host``."""
        what = ([f"sfedge {__version__}"] if self.sfedge else []) + self.pip
        reqs = " ".join(shlex.quote(r) for r in self.pip)
        if self.sfedge:
            how = (f"pass --install to copy this sfedge over as a wheel and install it{' with ' + reqs if reqs else ''}, "
                   f"or on {host} run: {python} -m pip install <sfedge-{__version__} wheel or sdist> {reqs}".rstrip())
        else:
            how = f"on {host} run: {python} -m pip install {reqs}, or pass --install"
        return RemoteError(f"{host}: {python} there cannot import what profiling needs (missing: {', '.join(what)})",
                           how)


def missing_requirements(probe: dict[str, Any], backends: Sequence[str]) -> Missing:
    """What ``probe`` (a host's :data:`PROBE` output) lacks to run ``backends``."""
    mods = probe.get("modules", {})
    missing = Missing(sfedge=not probe.get("sfedge"))
    if probe.get("sfedge") and probe["sfedge"] != __version__:
        missing.outdated = probe["sfedge"]
    if not missing.sfedge:  # a wheel install brings the core modules itself
        missing.pip += [m for m in CORE_MODULES if not mods.get(m)]
    for b in sorted(set(backends)):
        info = BACKENDS[b]
        if any(mods.get(m) for m in info.modules):
            continue
        if info.packages:
            missing.pip.extend(info.packages)
        else:
            missing.blocking.append(f"{b}'s runtime is missing and does not come from pip: {info.install}")
    return missing


def profile_remote(
    hosts: Sequence[str],
    bundles: Sequence[str | os.PathLike[str]],
    pairs: Sequence[str | os.PathLike[str]] = (),
    *,
    backend: str | None = None,
    config: MeasureConfig | None = None,
    out: Path = Path("reports/remote"),
    options: RemoteOptions | None = None,
    plots: bool = True,
    progress: Progress | None = None,
    layers: bool = False,
) -> list[RemoteResult]:
    """Profile ``bundles`` (paired with ``pairs``) on every host in parallel; reports land in ``out/<host>``.

    ``layers``: also per-layer times from the runtime's profiler there
    (``sfedge profile --layers``).  A latency kit given as a bundle is
    measured there into a latency table (the report carries it back).

    Hosts that fail keep their one-line error in the result; the others'
    reports are written regardless.
    """
    if not hosts:
        raise RemoteError("no remote hosts given", "pass --remote USER@HOST")
    for h in hosts:
        check_host(h)
    config, options = config or MeasureConfig(), options or RemoteOptions()
    paths = [Path(b) for b in [*bundles, *pairs]]
    for p in paths:
        if not p.exists():
            raise RemoteError(f"{p} does not exist", "give bundle folders written by `sfedge build`")
        check_no_links(p)
    backends = sorted({s.backend for p in paths for s in subjects_from(p, backend)})
    names = remote_names(paths)
    lock_progress = _ThreadSafeProgress(progress, len(hosts))
    labels = host_labels(hosts)
    for label in labels.values():
        check_output_dir(out / label, OUTPUT_KIND)  # refused now, not after the devices have been measured

    def one(i: int, host: str) -> RemoteResult:
        start = time.monotonic()
        result = RemoteResult(host)
        try:
            _profile_one(host, labels[host], paths, names, len(bundles), backend, backends, config, out, options,
                         plots, result, lambda msg, f=None: lock_progress(i, f"{labels[host]}: {msg}", f), layers)
        except RemoteError as e:
            result.error = str(e)
        result.seconds = time.monotonic() - start
        return result

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        results = list(pool.map(one, range(len(hosts)), hosts))
    failed = [r for r in results if r.error]
    if failed and len(failed) == len(results):
        raise RemoteError("; ".join(r.error for r in failed))
    return results


def _profile_one(host: str, label: str, paths: list[Path], names: list[str], n_bundles: int, backend: str | None,
                 backends: list[str], config: MeasureConfig, out: Path, options: RemoteOptions, plots: bool,
                 result: RemoteResult, say: Progress, layers: bool = False) -> None:
    with remote_bundles(host, label, paths, names, backends, options, result, say) as (remote, run_dir, py):
        argv = [f"bundles/{n}" for n in names[:n_bundles]]
        for n in names[n_bundles:]:
            argv += ["--pair", f"bundles/{n}"]
        if backend:
            argv += ["--backend", backend]
        argv += config.to_argv()
        argv += ["-o", "report", "--device", label, "--no-plots", "--json"] + (["--layers"] if layers else [])
        say("profiling", 0.3)
        remote.ssh(f"cd {shlex.quote(run_dir)} && {py} -m sfedge.cli profile {' '.join(shlex.quote(a) for a in argv)}",
                   "profiling")
        say("fetching the report", 0.9)
        with tempfile.TemporaryDirectory(prefix="sfedge-remote-") as tmp:
            remote.get(f"{run_dir}/report", Path(tmp) / "report", "copying the report back")

            report = load_report(Path(tmp) / "report")
        report.host["ssh"] = host
        report.notes += [n for n in result.notes if n not in report.notes]
        result.report_dir = out / label
        report.write(result.report_dir, plots=plots)
        say("done", 1.0)


@contextlib.contextmanager
def remote_bundles(host: str, label: str, paths: Sequence[Path], names: Sequence[str], backends: Sequence[str],
                   options: RemoteOptions, result: RemoteResult, say: Progress) -> Iterator[tuple[SSHHost, str, str]]:
    """A work folder on ``host`` holding ``paths`` as ``bundles/<name>``, with sfedge and the runtimes of
    ``backends`` importable by ``options.python`` there; yields (host, work folder, quoted remote python).

    The one place that probes a host, installs what is missing (only with
    ``options.install``; otherwise a RemoteError with the exact pip command),
    copies bundles and cleans up afterwards (unless ``options.keep``), so
    profiling and on-device verification reach devices the same way.
    """
    remote = SSHHost(host, options)
    say("probing", 0.05)
    result.probe = probe_host(host, options, backends)
    missing = missing_requirements(result.probe, backends)
    if missing.blocking:
        raise RemoteError(f"{host}: {missing.blocking[0]}")
    if (missing.sfedge or missing.pip) and not options.install:
        raise missing.message(host, options.python)
    run_dir = f"{options.workdir}/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{label}"
    py = _remote_path_arg(options.python)
    safe_py = py + (" -P" if _version_at_least(result.probe.get("python"), (3, 11)) else "")  # see sfedge.isolation
    remote.ssh(f"mkdir -p {shlex.quote(run_dir)}/bundles", "creating the work folder")
    try:
        wheel = missing.sfedge or (missing.outdated is not None and options.install)
        if wheel or missing.pip:
            say("installing", 0.1)
            result.installed = _install(remote, run_dir, py, wheel, missing.pip)
        elif missing.outdated:
            result.notes.append(f"{label} runs sfedge {missing.outdated}, not this {__version__} "
                                "(pass --install to update it)")
        say("copying bundles", 0.2)
        for path, name in zip(paths, names):
            remote.put([path], f"{run_dir}/bundles/{name}", f"copying {path.name}")
        yield remote, run_dir, safe_py
    finally:
        if not options.keep:
            try:
                remote.ssh(f"rm -rf {shlex.quote(run_dir)}", "cleaning up", timeout=60)
            except RemoteError:
                pass


def _install(remote: SSHHost, run_dir: str, py: str, wheel: bool, requirements: list[str]) -> list[str]:
    """pip-install on the remote: this sfedge as a wheel (when ``wheel``) and ``requirements``, nothing else."""
    reqs = list(requirements)
    if wheel:
        built = _build_wheel()
        remote.put([built], f"{run_dir}/{built.name}", "copying the sfedge wheel")
        reqs.insert(0, f"{run_dir}/{built.name}")
    remote.ssh(f"{py} -m pip install --disable-pip-version-check -q {' '.join(shlex.quote(r) for r in reqs)}",
               "installing with pip (if pip refuses an externally managed Python, create a venv there and pass "
               "--remote-python ~/venv/bin/python)", timeout=1800)
    return [Path(r).name if r.endswith(".whl") else r for r in reqs]


_WHEEL_CACHE: dict[str, Path] = {}


def _build_wheel() -> Path:
    """A wheel of the sfedge this process runs (built once per process from its source tree)."""
    root = Path(sfedge.__file__).resolve().parent.parent
    if str(root) in _WHEEL_CACHE and _WHEEL_CACHE[str(root)].exists():
        return _WHEEL_CACHE[str(root)]
    if not (root / "pyproject.toml").is_file():
        raise RemoteError("--install needs sfedge's source tree to build a wheel, and this sfedge is installed "
                          "without one", "copy an sfedge wheel to the device and pip-install it there")
    folder = Path(tempfile.mkdtemp(prefix="sfedge-wheel-"))
    p = subprocess.run(python_argv("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                                   str(folder), str(root)), capture_output=True, text=True, cwd=neutral_cwd())
    wheels = sorted(folder.glob("sfedge-*.whl"))
    if p.returncode != 0 or not wheels:
        raise RemoteError(f"building an sfedge wheel failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}",
                          "pip install setuptools wheel, then retry")
    _WHEEL_CACHE[str(root)] = wheels[0]
    return wheels[0]


def _version_at_least(version: object, minimum: tuple[int, ...]) -> bool:
    """True when a "3.11.7"-style version string is at least ``minimum``."""
    try:
        return tuple(int(x) for x in str(version).split(".")[: len(minimum)]) >= minimum
    except ValueError:
        return False


def remote_names(paths: Sequence[Path]) -> list[str]:
    """Safe, unique folder names for the copied bundles."""
    names: list[str] = []
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", p.resolve().name) or "bundle"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def host_labels(hosts: Sequence[str]) -> dict[str, str]:
    """Report/device names per host: the host part of USER@HOST, made file-name safe and unique."""
    labels: dict[str, str] = {}
    for h in hosts:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", h.split("@")[-1]) or "host"
        name, k = base, 2
        while name in labels.values():
            name, k = f"{base}_{k}", k + 1
        labels[h] = name
    return labels


class _ThreadSafeProgress:
    """Folds per-host progress into one bar: the fraction is the mean over hosts."""

    def __init__(self, progress: Progress | None, n: int) -> None:
        import threading

        self.progress, self.fractions, self.lock = progress, [0.0] * n, threading.Lock()

    def __call__(self, i: int, message: str, fraction: float | None) -> None:
        if self.progress is None:
            return
        with self.lock:
            if fraction is not None:
                self.fractions[i] = fraction
            self.progress(message, sum(self.fractions) / len(self.fractions))
