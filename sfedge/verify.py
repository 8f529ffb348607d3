"""Verify a bundle on the device: its files are the ones built, and its artifacts still agree with torch.

Needs only numpy and the runtime of each artifact (no torch): the bundle
carries the held-out inputs and the fp32 torch outputs on them.  An artifact
whose runtime is missing here is reported as skipped, not failed; a changed or
missing file fails verification and is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfedge.backends.registry import runner_for
from sfedge.bundle import FileCheck, check_files, load_bundle
from sfedge.errors import BackendUnavailable, SfedgeError
from sfedge.parity import measure

__all__ = ["ArtifactCheck", "VerifyReport", "verify_bundle"]


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
class VerifyReport:
    """Everything ``sfedge verify`` checked."""

    bundle: str
    files: FileCheck
    artifacts: list[ArtifactCheck]

    @property
    def passed(self) -> bool:
        return self.files.passed and not any(a.status == "fail" for a in self.artifacts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle, "passed": self.passed,
            "files": {"ok": len(self.files.ok), "changed": self.files.changed, "missing": self.files.missing,
                      "extra": self.files.extra},
            "artifacts": [a.__dict__ for a in self.artifacts],
        }


def verify_bundle(path: str | Path, *, backend: str | None = None, threads: int | None = None) -> VerifyReport:
    """Re-hash every file and re-run every runnable artifact on the stored held-out inputs."""
    bundle = load_bundle(path)
    files = check_files(bundle)
    tolerance = bundle.tolerance
    checks: list[ArtifactCheck] = []
    inputs = reference = None
    for art in bundle.artifacts:
        if backend is not None and art.backend != backend:
            continue
        rel = str(art.path.relative_to(bundle.path))
        check = ArtifactCheck(art.backend, rel, art.precision, "skipped",
                              built_parity=art.parity.as_dict() if art.parity else {})
        checks.append(check)
        if art.kind == "device-folder":
            check.reason = "engine not built yet: run `sfedge build <bundle>` on the device"
            continue
        if rel in files.changed or rel in files.missing:
            check.status, check.reason = "fail", "artifact file changed or missing"
            continue
        if inputs is None:
            inputs, reference = bundle.reference()
        try:
            with runner_for(art.path, backend=art.backend, threads=threads or bundle.manifest["target"].get("threads")) as r:
                parity = measure(r, inputs, reference, bundle.task)
                shifted_data = bundle.shifted_reference()
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
        failures = tolerance.failures(parity)
        if shifted is not None:
            check.shifted_parity = shifted.as_dict()
            failures += [f"shifted split: {f}" for f in tolerance.for_shifted().failures(shifted)]
        check.status = "fail" if failures else "pass"
        check.reason = "; ".join(failures)
    return VerifyReport(str(bundle.path), files, checks)

