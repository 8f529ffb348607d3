"""What to measure: the configurations in a bundle or an artifact file, and SFConv-vanilla pairs of them.

Device side: reads manifests (no torch), names backends through the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sfedge.backends.registry import backend_for_path
from sfedge.bundle import is_bundle, load_bundle
from sfedge.errors import BundleError, ConfigError
from sfedge.profile.latency_table import is_kit, kit_subjects
from sfedge.profile.types import Subject

__all__ = ["subjects_from", "pair_up"]


def subjects_from(path: str | Path, backend: str | None = None) -> list[Subject]:
    """The configurations in a bundle (every runnable artifact, or the one for ``backend``) or a bare artifact file."""
    p = Path(path)
    if is_kit(p):  # a latency kit: its whole models (the per-layer ones are measured by measure_kit)
        return [s for s in kit_subjects(p) if backend in (None, s.backend)]
    if p.is_file():
        found = backend_for_path(p)
        if backend and backend != found:
            raise ConfigError(f"{p.name} is a {found} artifact, not {backend}", f"drop --backend or use --backend {found}")
        return [Subject(p, found, p.stem, "unknown", label=p.name)]
    if not is_bundle(p):
        raise BundleError(f"{p} is neither a bundle folder nor an artifact file",
                          "give a folder written by `sfedge build` or an .onnx / .tflite / .engine file")
    bundle = load_bundle(p)
    artifacts = [bundle.artifact(backend)] if backend else [a for a in bundle.artifacts if a.kind != "device-folder"]
    if not artifacts:
        bundle.artifact()  # raises the bundle's own "no runnable artifact" error
    model = bundle.manifest["model"]
    s = model.get("s") if model.get("conv") == "sfconv" else None  # dense configs may carry an unused s
    name = f"{bundle.model_name}(s={s:g})" if isinstance(s, (int, float)) else bundle.model_name
    ref = (bundle.manifest.get("reference") or {}).get("inputs")
    meta = {"bundle": str(p), "target": bundle.target_name, "family": model.get("family"), "conv": model.get("conv"),
            "s": s, "macs": model.get("macs"), "params": model.get("params"), "pair_key": bundle.pair_key}
    out = []
    for a in artifacts:
        size = sum(int(e.get("size", 0)) for e in bundle.manifest["artifacts"] if e["path"] == str(a.path.relative_to(p)))
        size += sum(f.stat().st_size for f in a.files if f.is_file() and f.name.startswith(a.path.name))
        out.append(Subject(a.path, a.backend, name, a.precision, threads=bundle.manifest["target"].get("threads"),
                           input=(p / ref) if ref and (p / ref).is_file() else None, size_bytes=size,
                           meta={**meta, "parity": a.parity.as_dict() if a.parity else {}}))
    return out


def pair_up(candidates: Sequence[Subject], baselines: Sequence[Subject]) -> list[tuple[Subject, Subject]]:
    """Match each candidate with the baseline of the same backend, precision and pairing key (model family/config, target).

    A lone candidate and a lone baseline of the same backend pair even without
    bundle metadata (bare artifact files).
    """
    pairs = []
    for c in candidates:
        same = [b for b in baselines if b.backend == c.backend and b.precision == c.precision
                and b.meta.get("pair_key") == c.meta.get("pair_key")]
        if not same and len(baselines) == 1 and baselines[0].backend == c.backend and not c.meta.get("pair_key"):
            same = list(baselines)
        if not same:
            have = ", ".join(f"{b.label}" for b in baselines) or "none"
            raise ConfigError(
                f"no --pair artifact matches {c.label} (same backend, precision, target and model family/config needed)",
                f"--pair gave: {have}; build the vanilla bundle for the same target and precision",
            )
        pairs.append((c, same[0]))
    return pairs
