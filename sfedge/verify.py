"""Verify a bundle on the device: its files are the ones built, and its artifacts still agree with torch.

Needs only numpy and the runtime of each artifact (no torch): the bundle
carries the held-out inputs and the fp32 torch outputs on them.

A bundle is untrusted input, so the manifest does not get to decide what
counts as a pass (README: Security model):

- every file is re-hashed, and a file the manifest does not list, a symlink
  or a special file fails, as does a changed or missing one;
- tolerances come from the target of the same name installed here (or
  sfedge's defaults when there is none, or the caller's overrides); a manifest
  that records a looser one than that, key by key, fails;
- a verify that ran no artifact fails (unless ``files_only`` asked for hashes
  and signature alone), so "nothing could be checked" is never a PASS;
- an SSH signature (:mod:`sfedge.signing`) is checked when allowed signers are
  given, and required when they are given, when ``require_signature`` is set,
  or when the installed target says ``require_signature = true``;
- once a device added its engine (:mod:`sfedge.device_build`), the manifest
  must be the one first built (``manifest.origin.json``, whose signature is
  the one checked) plus that engine and nothing else.

An artifact whose runtime is missing here is reported as skipped.  Exit codes
(``sfedge verify``): 0 PASS, 1 FAIL, 2 usage or setup error, 3 not a readable,
well-formed bundle (:class:`~sfedge.errors.MalformedBundleError`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sfedge.backends.registry import BACKENDS, runner_for
from sfedge.bundle import (
    ORIGIN,
    ORIGIN_SIGNATURE,
    SIGNATURE,
    Bundle,
    FileCheck,
    check_files,
    load_bundle,
    read_manifest,
)
from sfedge.errors import BackendUnavailable, BundleError, ConfigError, MalformedBundleError, SfedgeError
from sfedge.fileio import read_limited, sha256_bytes
from sfedge.manifest import is_safe_name
from sfedge.parity import DEFAULT_TOLERANCES, TOLERANCE_KEYS, Tolerance, measure, tolerance_for
from sfedge.signing import MAX_SIGNATURE_BYTES, check_signature
from sfedge.targets import Target, load_target, target_dirs

__all__ = [
    "ArtifactCheck", "VerifyReport", "SignatureStatus", "TolerancePolicy", "verify_bundle", "resolve_tolerance",
    "installed_target", "check_bundle_signature", "check_origin", "ensure_verified", "EXIT_CODES",
]

EXIT_CODES = {0: "PASS", 1: "FAIL", 2: "usage or setup error", 3: "not a readable, well-formed bundle"}
# Tolerance keys that are upper bounds (a larger value is looser); every other key is a lower bound (cosine, Dice, PSNR).
UPPER_BOUNDS = ("max_abs", "relative_max_abs")


@dataclass
class ArtifactCheck:
    """Parity of one artifact on this device (status: pass | fail | skipped)."""

    backend: str
    path: str
    precision: str
    status: str
    parity: dict[str, float] = field(default_factory=dict)
    built_parity: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    shifted_parity: dict[str, float] = field(default_factory=dict)  # on the shifted split, where the bundle has one


@dataclass
class SignatureStatus:
    """What the signature check found: valid | invalid | unsigned | unchecked (signed, no signers given)."""

    status: str
    required: bool = False
    principal: str | None = None
    reason: str = ""
    covers: str = "manifest.json"

    @property
    def passed(self) -> bool:
        return self.status == "valid" or (not self.required and self.status in ("unsigned", "unchecked"))


@dataclass
class TolerancePolicy:
    """The tolerance verify applies, where it came from, and how the manifest's own claim is looser (if at all)."""

    tolerance: Tolerance
    source: str
    looser: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Everything ``sfedge verify`` checked."""

    bundle: str
    files: FileCheck
    artifacts: list[ArtifactCheck]
    signature: SignatureStatus = field(default_factory=lambda: SignatureStatus("unsigned"))
    tolerance: TolerancePolicy | None = None
    problems: list[str] = field(default_factory=list)  # bundle-level reasons to fail
    files_only: bool = False

    @property
    def passed(self) -> bool:
        return (self.files.passed and self.signature.passed and not self.problems
                and not any(a.status == "fail" for a in self.artifacts))

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle, "passed": self.passed, "exit_code": 0 if self.passed else 1,
            "files": {"ok": len(self.files.ok), "changed": self.files.changed, "missing": self.files.missing,
                      "extra": self.files.extra, "unsafe": self.files.unsafe},
            "signature": self.signature.__dict__ | {"passed": self.signature.passed},
            "tolerance": ({"applied": self.tolerance.tolerance.as_dict(), "source": self.tolerance.source}
                          if self.tolerance else None),
            "problems": list(self.problems), "files_only": self.files_only,
            "artifacts": [a.__dict__ for a in self.artifacts],
        }


def installed_target(name: str, bundle_path: str | Path | None = None) -> Target | None:
    """The target called ``name`` in this machine's target folders, or None.

    Looked up by name only (a manifest cannot point at a file), and never in a
    folder inside the bundle being checked: a bundle cannot ship the target
    that judges it.
    """
    if not is_safe_name(name):
        return None
    inside = Path(bundle_path).resolve() if bundle_path is not None else None
    for d in target_dirs():
        r = d.resolve()
        if inside is not None and (r == inside or inside in r.parents):
            continue
        f = d / f"{name}.toml"
        if f.is_file():
            return load_target(f)
    return None


def resolve_tolerance(recorded_target: Mapping[str, Any], precision: str, installed: Target | None = None,
                      override: Mapping[str, float] | None = None) -> TolerancePolicy:
    """The tolerance to apply to a bundle of ``precision``, and where the manifest asks for less.

    The reference is the installed target's tolerance (else sfedge's
    defaults), with ``override`` (KEY=VALUE from the command line) on top.
    The manifest's own tolerance (``recorded_target["tolerances"]``) is only
    compared with it, key by key: a larger max_abs, a smaller cosine or mask
    Dice, or a key the reference checks and the manifest drops is "looser".
    """
    if precision not in DEFAULT_TOLERANCES:
        raise MalformedBundleError(f"unknown precision {precision!r}", f"valid: {', '.join(DEFAULT_TOLERANCES)}")
    if installed is not None:
        base, source = installed.tolerance(precision), f"target {installed.name} installed here"
    else:
        base = DEFAULT_TOLERANCES[precision]
        source = f"sfedge's default tolerances (target {recorded_target.get('name')!r} is not installed here)"
    if override:
        unknown = [k for k in override if k not in TOLERANCE_KEYS]
        if unknown:
            raise ConfigError(f"unknown tolerance key(s) {', '.join(unknown)}", f"valid: {', '.join(TOLERANCE_KEYS)}")
        base = replace(base, **{k: float(v) for k, v in override.items()})
        source += ", with command-line overrides"
    claimed = tolerance_for(recorded_target.get("tolerances") or {}, precision)
    looser = []
    for key in TOLERANCE_KEYS:
        want, got = getattr(base, key), getattr(claimed, key)
        if want is None:
            continue
        if got is None:
            looser.append(f"it drops {key} (required: {want:g})")
        elif (got > want) if key in UPPER_BOUNDS else (got < want):
            looser.append(f"{key} {got:g} where {want:g} is required")
    return TolerancePolicy(base, source, looser)


def check_origin(bundle: Bundle) -> tuple[list[str], bytes]:
    """(problems, origin bytes) for a bundle a device completed: it must be its first manifest plus the engine only.

    The first manifest (``manifest.origin.json``) is what the workstation
    wrote (and maybe signed); the device may add engine artifacts and the
    files they bring inside the TensorRT device folder, plus its own
    ``origin`` and ``device_build`` records, nothing else.
    """
    m = bundle.manifest
    origin, raw = read_manifest(bundle.path / ORIGIN)
    problems = []
    if sha256_bytes(raw) != m["origin"]["sha256"]:
        problems.append(f"{ORIGIN} is not the one the manifest records (sha256 differs)")
    if origin.get("origin") is not None:
        problems.append(f"{ORIGIN} itself names an origin")
    folders = [a["path"] for a in origin["artifacts"] if a["kind"] == "device-folder"]

    def in_device_folder(rel: str) -> bool:
        return any(rel.startswith(f + "/") for f in folders)

    n = len(origin["artifacts"])
    if m["artifacts"][:n] != origin["artifacts"]:
        problems.append("artifacts built on the workstation were changed after the device build")
    for a in m["artifacts"][n:]:
        if a["kind"] != "engine" or not in_device_folder(a["path"]):
            problems.append(f"artifact {a['path']} was added after the build and is not an engine in the device folder")
    for rel, entry in origin["files"].items():
        if m["files"].get(rel) != entry:
            problems.append(f"file {rel} is listed differently than when the bundle was built")
    for rel in m["files"]:
        if rel not in origin["files"] and not in_device_folder(rel):
            problems.append(f"file {rel} was added after the build outside the device folder")
    for key in (set(origin) | set(m)) - {"artifacts", "files", "origin", "device_build"}:
        if origin.get(key) != m.get(key):
            problems.append(f"manifest key '{key}' differs from the one first built")
    return problems, raw


def check_bundle_signature(bundle: Bundle, installed: Target | None = None, allowed_signers: str | None = None,
                           require: bool = False, origin_raw: bytes | None = None) -> SignatureStatus:
    """Check the bundle's SSH signature, and whether one is required here.

    Allowed signers: ``allowed_signers``, else $SFEDGE_ALLOWED_SIGNERS, else
    the installed target's ``allowed_signers``.  A signature is required when
    ``require``, when allowed signers were given by the caller or the
    environment, or when the installed target says ``require_signature``.
    Valid is either a signature of manifest.json itself, or (a bundle a device
    completed) one of its first manifest, whose derivation :func:`check_origin`
    checks; the engine the device added is then checked by hash and parity.
    """
    given = allowed_signers or os.environ.get("SFEDGE_ALLOWED_SIGNERS") or None
    signers = given or (installed.allowed_signers if installed else None)
    required = bool(require or given or (installed is not None and installed.require_signature))
    candidates = []
    if os.path.lexists(bundle.path / SIGNATURE):
        candidates.append((bundle.path / SIGNATURE, bundle.raw, "manifest.json"))
    if origin_raw is not None and os.path.lexists(bundle.path / ORIGIN_SIGNATURE):
        candidates.append((bundle.path / ORIGIN_SIGNATURE, origin_raw, f"{ORIGIN}; the engine was added on the device"))
    if not candidates:
        return SignatureStatus("unsigned", required, reason="the bundle is not signed")
    if not signers:
        if required:
            raise ConfigError(f"a signature is required for {bundle.path} but no allowed signers file is set",
                              "pass --allowed-signers FILE (or set allowed_signers in the target)")
        return SignatureStatus("unchecked", required, reason="signed; pass --allowed-signers FILE to check who signed it",
                               covers=candidates[0][2])
    reasons = []
    for sig_path, data, covers in candidates:
        sig = read_limited(sig_path, MAX_SIGNATURE_BYTES, MalformedBundleError, "re-sign or rebuild the bundle")
        result = check_signature(data, sig, signers)
        if result.valid:
            return SignatureStatus("valid", required, result.principal, covers=covers)
        reasons.append(f"{sig_path.name}: {result.reason}")
    return SignatureStatus("invalid", required, reason="; ".join(reasons), covers=candidates[0][2])


def verify_bundle(
    path: str | Path,
    *,
    backend: str | None = None,
    threads: int | None = None,
    allowed_signers: str | None = None,
    require_signature: bool = False,
    files_only: bool = False,
    tolerance_override: Mapping[str, float] | None = None,
) -> VerifyReport:
    """Check signature, files, the manifest's tolerance claim, then re-run every runnable artifact on the stored held-out inputs."""
    bundle = load_bundle(path)
    if not bundle.manifest.get("reference"):
        raise MalformedBundleError(f"{bundle.path / 'manifest.json'} names no reference data, so nothing can be "
                                   "verified", "rebuild the bundle with `sfedge build`")
    installed = installed_target(bundle.target_name, bundle.path)
    problems: list[str] = []
    origin_raw = None
    if bundle.manifest.get("origin") is not None:
        found, origin_raw = check_origin(bundle)
        problems += found
    signature = check_bundle_signature(bundle, installed, allowed_signers, require_signature, origin_raw)
    files = check_files(bundle)
    policy = resolve_tolerance(bundle.manifest["target"], bundle.precision, installed, tolerance_override)
    if policy.looser:
        problems.append(f"the manifest asks for a looser tolerance than {policy.source}: {'; '.join(policy.looser)}")
    artifacts = bundle.artifacts
    for art in artifacts:
        if art.backend not in BACKENDS:
            raise MalformedBundleError(f"{bundle.path}: artifact {art.path.name} names an unknown backend "
                                       f"{art.backend!r}", f"known: {', '.join(BACKENDS)}")
    if backend is not None:
        bundle.artifact(backend)  # BundleError naming the backends it has
    checks: list[ArtifactCheck] = []
    inputs = reference = None
    bad = set(files.changed) | set(files.missing) | set(files.unsafe)
    for art in artifacts:
        if backend is not None and art.backend != backend:
            continue
        rel = art.path.relative_to(bundle.path).as_posix()
        check = ArtifactCheck(art.backend, rel, art.precision, "skipped",
                              built_parity=art.parity.as_dict() if art.parity else {})
        checks.append(check)
        if art.kind == "device-folder":
            check.reason = "engine not built yet: run `sfedge build <bundle>` on the device"
            continue
        if rel in bad:
            check.status, check.reason = "fail", "artifact file changed, missing or not a regular file"
            continue
        if files_only:
            check.reason = "--files-only: parity not checked"
            continue
        if inputs is None:  # read once for every artifact
            inputs, reference = bundle.reference()
            shifted_data = bundle.shifted_reference()
        try:
            with runner_for(art.path, backend=art.backend, threads=threads or bundle.manifest["target"].get("threads")) as r:
                parity = measure(r, inputs, reference, bundle.task)
                shifted = measure(r, *shifted_data, bundle.task) if shifted_data is not None else None
        except BackendUnavailable as e:
            check.reason = str(e)
            continue
        except SfedgeError:
            raise
        except Exception as e:  # a runtime that cannot load the file: the artifact is broken
            check.status, check.reason = "fail", f"runtime error: {e}".splitlines()[0]
            continue
        check.parity = parity.as_dict()
        failures = policy.tolerance.failures(parity)
        if shifted is not None:
            check.shifted_parity = shifted.as_dict()
            failures += [f"shifted split: {f}" for f in policy.tolerance.for_shifted().failures(shifted)]
        check.status = "fail" if failures else "pass"
        check.reason = "; ".join(failures)
    if not files_only and not any(c.status != "skipped" for c in checks):
        why = "; ".join(dict.fromkeys(c.reason for c in checks if c.reason)) or "no artifact"
        problems.append(f"nothing was checked: no artifact could be run here ({why}); "
                        "--files-only checks hashes and signature alone")
    return VerifyReport(str(bundle.path), files, checks, signature, policy, problems, files_only)


def ensure_verified(report: VerifyReport, what: str) -> None:
    """BundleError with every reason when ``report`` did not pass: for steps that must trust the bundle first."""
    if report.passed:
        return
    reasons = report.files.problems() + report.problems
    if not report.signature.passed:
        reasons.append(f"signature {report.signature.status}: {report.signature.reason}")
    reasons += [f"{a.path}: {a.reason}" for a in report.artifacts if a.status == "fail"]
    shown = "; ".join(reasons[:4]) + (f" (and {len(reasons) - 4} more)" if len(reasons) > 4 else "")
    raise BundleError(f"{report.bundle} does not verify, so {what} refuses it: {shown}",
                      "copy the bundle again from where it was built, or rebuild it")
