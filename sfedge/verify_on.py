"""Parity on the device's own kernels: a new bundle is verified on remote devices before it exists.

The build machine (x86-64) and an ARM device run different kernels: XNNPACK
and MLAS pick micro-kernels per instruction set, and on ARMv8.2+ cores an
fp16 .tflite that carries the reduced-precision metadata is computed in fp16.
The parity measured at build time is the x86 figure; it says little about
the device's.  ``sfedge build ... --verify-on USER@HOST`` copies the finished
bundle (still under its temporary name) to each host over ssh/scp, the same
way ``sfedge profile --remote`` does (:func:`sfedge.profile.remote.remote_bundles`:
probe, ``--install``, copy, clean up), runs ``sfedge verify --json`` there,
and records per artifact, beside the build machine's ``parity``::

    "parity_on": {"aarch64": {"parity": {...}, "status": "pass", "host": "pi@raspberrypi",
                              "emulated": false, "cpu_features": [...], ...}}

An artifact that misses the target's tolerance on a device fails the build
(ParityError): the bundle is never renamed into place.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfedge.bundle import MANIFEST
from sfedge.errors import ParityError, RemoteError
from sfedge.fileio import write_json
from sfedge.profile.remote import RemoteOptions, RemoteResult, host_labels, remote_bundles
from sfedge.progress import Progress

__all__ = ["VerifyOn", "parity_on_text"]

ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
# Printed on the device before `sfedge verify --json`: how the device sees itself (emulated or not, CPU features).
DEVICE_FACTS = ("import json, platform; from sfedge.profile.emulation import emulation_info; "
                "print(json.dumps({**emulation_info(), 'machine': platform.machine(), "
                "'python': platform.python_version()}))")


def _arch(machine: str | None) -> str:
    m = (machine or "").lower()
    return ARCH_ALIASES.get(m, m)


@dataclass
class VerifyOn:
    """Remote hosts a bundle must pass ``sfedge verify`` on before it exists, and how to reach them."""

    hosts: list[str]
    options: RemoteOptions = field(default_factory=RemoteOptions)

    def recorded(self, manifest: dict[str, Any]) -> bool:
        """True when every runnable artifact already passed on every one of these hosts (nothing to rebuild)."""
        for a in manifest.get("artifacts", []):
            if a.get("kind") == "device-folder":
                continue
            passed = {e.get("host") for e in (a.get("parity_on") or {}).values() if e.get("status") == "pass"}
            if not set(self.hosts) <= passed:
                return False
        return True

    def check(self, folder: Path, name: str, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
        """Verify the bundle in ``folder`` on every host (in parallel) and record ``parity_on`` in its manifest.

        ``name`` is what the bundle will be called (the folder is still the
        temporary one).  Returns {host: device facts}.  Raises RemoteError
        when a host cannot be reached or is not of the target's architecture,
        and ParityError when an artifact misses the tolerance on a device.
        """
        say = progress or (lambda message, fraction=None: None)
        manifest = json.loads((folder / MANIFEST).read_text())
        backends = sorted({a["backend"] for a in manifest["artifacts"] if a.get("kind") != "device-folder"})
        labels = host_labels(self.hosts)

        # The device holds the bundle to the tolerance of the target it is built for (this machine's definition, as
        # recorded in the manifest): the device may not have that target installed, and its defaults are looser.
        wanted = (manifest["target"].get("tolerances") or {}).get(manifest["precision"]) or {}
        tolerance_args = "".join(f" --tolerance {shlex.quote(f'{k}={float(v)!r}')}" for k, v in sorted(wanted.items())
                                 if v is not None)

        def one(host: str) -> tuple[dict[str, Any], dict[str, Any]]:
            return self._verify_one(host, labels[host], folder, name, backends, say, tolerance_args)

        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            futures = {h: pool.submit(one, h) for h in self.hosts}
        errors, outcomes = [], {}
        for host, fut in futures.items():
            try:
                outcomes[host] = fut.result()
            except RemoteError as e:
                errors.append(str(e))
        if errors:
            raise RemoteError("; ".join(errors))
        target_arch = _arch(manifest["target"].get("device", {}).get("arch"))
        for host, (facts, _) in outcomes.items():
            if target_arch and _arch(facts.get("machine")) != target_arch:
                raise RemoteError(f"{host} is {facts.get('machine')}, but {name} is for {target_arch} "
                                  f"(target {manifest['target']['name']})",
                                  "--verify-on a device of the target's architecture")
        failures = self._record(manifest, outcomes)
        write_json(folder / MANIFEST, manifest)
        if failures:
            raise ParityError(f"{name}: " + "; ".join(failures),
                              "the device's kernels disagree with the build machine's beyond the target's tolerance: "
                              "build another precision, or loosen that precision's tolerance in the target file "
                              "if the device's figure is acceptable")
        return {h: facts for h, (facts, _) in outcomes.items()}

    def _verify_one(self, host: str, label: str, folder: Path, name: str, backends: list[str],
                    say: Progress, tolerance_args: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
        result = RemoteResult(host)
        start = time.monotonic()
        with remote_bundles(host, label, [folder], [name], backends, self.options, result,
                            lambda msg, f=None: say(f"{label}: {msg}", None)) as (remote, run_dir, py):
            say(f"{label}: verifying on the device", None)
            out = remote.ssh(f"cd {shlex.quote(run_dir)} && {py} -c {shlex.quote(DEVICE_FACTS)} && "
                             f"{py} -m sfedge.cli verify {shlex.quote('bundles/' + name)} --json{tolerance_args}",
                             "verifying the bundle", ok=(0, 1))
        first, _, rest = out.strip().partition("\n")
        try:
            facts, report = json.loads(first), json.loads(rest[rest.index("{"):])
        except (ValueError, json.JSONDecodeError) as err:
            raise RemoteError(f"{host}: sfedge verify printed no JSON ({out.strip()[-160:]!r})",
                              "run `sfedge verify BUNDLE --json` there by hand to see why") from err
        facts.update(host=host, installed=result.installed, seconds=round(time.monotonic() - start, 1))
        return facts, report

    def _record(self, manifest: dict[str, Any], outcomes: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
        """Write each host's figures into the manifest's artifacts; return the failures, one line each."""
        failures: list[str] = []
        by_path = {a["path"]: a for a in manifest["artifacts"]}
        used: set[str] = set()
        for host, (facts, report) in outcomes.items():
            arch = _arch(facts.get("machine")) or "unknown"
            key = arch if arch not in used else f"{arch} ({host})"
            used.add(key)
            files = report.get("files", {})
            if files.get("changed") or files.get("missing"):
                failures.append(f"on {host} files differ from the manifest: {files.get('changed') + files.get('missing')}")
            for check in report.get("artifacts", []):
                art = by_path.get(check["path"])
                if art is None or check["status"] == "skipped" and art.get("kind") == "device-folder":
                    continue
                entry = {
                    "parity": check.get("parity", {}), "status": check["status"], "host": host,
                    "emulated": bool(facts.get("emulated")), "python": facts.get("python"),
                    "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                for k in ("emulation", "cpu_features", "fp16_arithmetic"):
                    if k in facts:
                        entry[k] = facts[k]
                if check.get("reason"):
                    entry["reason"] = check["reason"]
                art.setdefault("parity_on", {})[key] = entry
                if check["status"] != "pass":
                    built = _metrics(art.get("parity", {}))
                    failures.append(f"{art['backend']} {art['precision']} {art['path']} on {key}"
                                    f"{' (emulated)' if entry['emulated'] else ''}: {check.get('reason') or check['status']}"
                                    f" (here: {_metrics(check.get('parity', {}))}; build machine: {built})")
        return failures


def _metrics(parity: dict[str, Any]) -> str:
    keys = ("max_abs", "cosine", "dice_agreement")
    return ", ".join(f"{k} {parity[k]:.4g}" for k in keys if isinstance(parity.get(k), (int, float))) or "-"


def parity_on_text(artifact: dict[str, Any]) -> str:
    """One cell for tables: each device architecture's parity and status (``-`` when never verified on one)."""
    parts = []
    for arch, e in (artifact.get("parity_on") or {}).items():
        parts.append(f"{arch}{' (emulated)' if e.get('emulated') else ''}: {e.get('status')} "
                     f"({_metrics(e.get('parity', {}))})")
    return "; ".join(parts) or "-"


def parse_hosts(values: Sequence[str]) -> list[str]:
    """--verify-on values, deduplicated, in order; USER@HOST or an ssh_config alias."""
    out = []
    for v in values:
        if not re.fullmatch(r"[^\s;&|`$]+", v):
            raise RemoteError(f"--verify-on {v!r} is not USER@HOST or an ssh alias", "e.g. --verify-on pi@raspberrypi")
        if v not in out:
            out.append(v)
    return out
