"""Rank sweep: factorize a vanilla model at several s, build, check and profile each; find the Pareto front.

MAC counts say s=0.125 is 3x cheaper than s=0.5; the device may disagree
(two thin convolutions can be slower than one dense one, some kernels have
fixed costs).  The sweep measures instead: every s becomes an SFConv
checkpoint by truncated SVD (:func:`sfedge.build.factorize_checkpoint`), a
bundle for the target (each artifact parity-checked against its own torch
model by the build), and a configuration in *one* rotating measurement with
the vanilla bundle, so every latency ratio to vanilla is paired.

Quality is judged two ways: the artifact's agreement with the *vanilla*
model on the held-out inputs (what factorizing plus converting cost; Dice of
the thresholded masks, max abs, cosine), and, where labels exist (the fundus
demo's pseudo-labels), the held-out Dice of the factorized torch model.  The
Pareto front is the set of points no other point beats on both latency and
quality.

Workstation side (torch, converters); the measurement itself runs in the
profiler's worker processes like any ``sfedge profile``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.registry import BACKENDS, runner_for
from sfedge.build import build_bundle, factorize_checkpoint
from sfedge.checkpoint import load_checkpoint, read_checkpoint_header, save_checkpoint
from sfedge.console import table
from sfedge.demo import demo_checkpoints
from sfedge.errors import ConfigError, SfedgeError
from sfedge.fileio import atomic_dir, write_json
from sfedge.parity import measure
from sfedge.profile.plots import plot_sweep
from sfedge.profile.report import Report
from sfedge.profile.schedule import measure_group
from sfedge.profile.stats import pareto_front
from sfedge.profile.subjects import subjects_from
from sfedge.profile.tables import markdown_page, markdown_table, write_csv
from sfedge.profile.types import MeasureConfig, Measurement
from sfedge.progress import Progress
from sfedge.source import resolve_model
from sfedge.targets import Target, load_target
from sfedge.train import DEMO_MODELS, TrainConfig, holdout_dice, train

__all__ = ["SweepPoint", "SweepResult", "sweep", "evaluate_points", "dense_checkpoint", "parse_s_values", "has_labels",
           "OUTPUT_KIND"]

OUTPUT_KIND = "sweep"  # the -o marker (sfedge.fileio.check_output_dir)


@dataclass
class SweepPoint:
    """One rank (or the vanilla model): its bundle, quality and measured latency."""

    name: str  # "vanilla", "s=0.25" or a plan's name
    s: float | None
    checkpoint: str
    kind: str = "uniform"  # "vanilla", "uniform" (one s for every layer) or "planned" (sfedge plan: a rank per layer)
    predicted_ms: float | None = None  # what a latency table predicted for it (sfedge plan), to set beside median_ms
    bundle: str | None = None
    macs: int | None = None
    params: int | None = None
    parity: dict[str, float] = field(default_factory=dict)  # artifact vs its own torch model (the build's gate)
    dice_agreement: float | None = None  # artifact vs the vanilla torch model, thresholded masks
    max_abs_vs_vanilla: float | None = None
    cosine_vs_vanilla: float | None = None
    holdout_dice: float | None = None  # factorized torch model vs labels (where the data has labels)
    median_ms: float | None = None
    p90_ms: float | None = None
    cv: float | None = None
    ratio: float | None = None  # median / vanilla median, paired
    ratio_low: float | None = None
    ratio_high: float | None = None
    error: str | None = None  # why this s has no measurement (e.g. its int8 artifact failed parity)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SweepResult:
    """All points, the Pareto fronts, and the profile report of the rotating measurement."""

    model: str
    target: str
    precision: str
    backend: str
    points: list[SweepPoint]
    report: Report | None
    notes: list[str] = field(default_factory=list)

    def front(self, quality: str) -> list[SweepPoint]:
        """Points on the latency/``quality`` Pareto front (fastest first)."""
        usable = [p for p in self.points if p.median_ms is not None and getattr(p, quality) is not None]
        rows = [{"median_ms": p.median_ms, quality: getattr(p, quality), "point": p} for p in usable]
        return [r["point"] for r in pareto_front(rows, quality)]

    def rows(self) -> list[dict[str, Any]]:
        on_parity = {id(p) for p in self.front("dice_agreement")}
        on_dice = {id(p) for p in self.front("holdout_dice")}
        rows = []
        for p in self.points:
            row = p.as_dict()
            own = row.pop("parity")
            row.update({f"own_parity_{k}": own.get(k) for k in ("max_abs", "cosine", "dice_agreement")})
            rows.append({**row, "front_parity": id(p) in on_parity, "front_dice": id(p) in on_dice})
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": "sfedge-sweep/1", "model": self.model, "target": self.target, "precision": self.precision,
            "backend": self.backend, "points": [p.as_dict() for p in self.points],
            "pareto_parity": [p.name for p in self.front("dice_agreement")],
            "pareto_dice": [p.name for p in self.front("holdout_dice")], "notes": self.notes,
            "device": self.report.device if self.report else None,
        }

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        header = ["point", "GMAC", "median ms", "vs vanilla (CI)", "Dice agr. vs vanilla", "max abs vs vanilla",
                  "held-out Dice", "front"]
        predicted = any(p.predicted_ms is not None for p in self.points)
        if predicted:
            header.insert(3, "table predicted ms")
        on_parity = {id(p) for p in self.front("dice_agreement")}
        on_dice = {id(p) for p in self.front("holdout_dice")}
        rows = []
        for p in self.points:
            ratio = (f"{p.ratio:.3f} [{p.ratio_low:.3f}, {p.ratio_high:.3f}]" if p.ratio is not None
                     else ("baseline" if p.s is None and p.median_ms is not None else "-"))
            front = "+".join(k for k, ids in (("parity", on_parity), ("Dice", on_dice)) if id(p) in ids)
            rows.append([p.name, f"{p.macs / 1e9:.3f}" if p.macs else "-",
                         f"{p.median_ms:.3f}" if p.median_ms is not None else (p.error or "-"), ratio,
                         _fmt(p.dice_agreement, ".4f"), _fmt(p.max_abs_vs_vanilla, ".3g"), _fmt(p.holdout_dice, ".4f"),
                         front or "-"])
            if predicted:
                rows[-1].insert(3, _fmt(p.predicted_ms, ".3f"))
        return header, rows

    def tables(self) -> list[Any]:
        header, rows = self._table()
        return [table(f"rank sweep: {self.model} on {self.target} ({self.backend} {self.precision})", header, rows,
                      caption="vs vanilla = paired ratio of medians (lower is faster); front = on the Pareto front")]

    def markdown(self, figure: str | None = None) -> str:
        header, rows = self._table()
        lines = [f"# Rank sweep: {self.model} on {self.target} ({self.backend} {self.precision})", "",
                 "Latency measured in one rotating run (every configuration in its own process, order reversed each "
                 "round); ratios are paired with the vanilla model, with bootstrap CIs.", "",
                 *markdown_table(header, rows)]
        return markdown_page(lines, [figure] if figure else [], self.notes)

    def write(self, folder: str | os.PathLike[str], plots: bool = True) -> Path:
        """sweep.json, sweep.csv, sweep.md, sweep.png and the profile report (profile/) into ``folder``.

        An existing folder is replaced only when it is an earlier sweep
        (sfedge's marker); any other non-empty folder is refused.
        """
        folder = Path(folder)
        with atomic_dir(folder, kind=OUTPUT_KIND) as tmp:
            write_json(tmp / "sweep.json", self.as_dict())
            write_csv(tmp / "sweep.csv", self.rows())
            figure = None
            if plots:
                pts = [{**p.as_dict(), "name": p.name} for p in self.points]
                note = plot_sweep(pts, tmp / "sweep.png",
                                  f"{self.model} on {self.target} ({self.backend} {self.precision}): rank sweep")
                if note:
                    self.notes.append(note)
                else:
                    figure = "sweep.png"
            if self.report is not None:
                self.report.write(tmp / "profile", plots=plots)
            (tmp / "sweep.md").write_text(self.markdown(figure))
        return folder


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def parse_s_values(text: str) -> list[float]:
    """'1,0.5,0.25' -> [1.0, 0.5, 0.25] (each in (0, 1])."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"--s {text!r} is not a comma-separated list of numbers", "e.g. --s 1,0.5,0.25,0.125") from err
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise ConfigError(f"--s values must be in (0, 1], got {text!r}", "e.g. --s 1,0.5,0.25,0.125")
    return list(dict.fromkeys(values))


def sweep(
    model: str | os.PathLike[str],
    target: str,
    s_values: Sequence[float],
    *,
    precision: str | None = None,
    backend: str | None = None,
    calibration: str = "fundus-demo",
    bundles_dir: str | os.PathLike[str] = "bundles",
    checkpoints_dir: str | os.PathLike[str] | None = None,
    config: MeasureConfig | None = None,
    force: bool = False,
    labels: bool | None = None,
    finetune_steps: int = 0,
    model_config: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    task: str | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Factorize ``model`` (a vanilla checkpoint, a demo model name, or a model spec) at each s, build, check, profile.

    A spec (``file.py:factory``, ``package.module:factory``, a registry name)
    takes ``model_config``, ``weights`` and ``task`` and is saved once as the
    sweep's dense checkpoint.
    A rank whose build fails (e.g. its int8 artifact misses the parity
    tolerance) is kept in the result with its one-line error and left out
    of the measurement.  ``labels``: compute held-out Dice against the fundus
    pseudo-labels (default: when the checkpoint was trained on them).
    ``finetune_steps``: fine-tune each factorized model that many steps on the
    fundus demo before building (truncated SVD alone loses accuracy at small s;
    a short fine-tune recovers much of it).  Fine-tuned checkpoints are cached
    by the vanilla weights' hash, s and steps.
    """
    say = progress or (lambda message, fraction=None: None)
    tgt, prec, chosen = sweep_backend(target, precision, backend)
    ck_dir = Path(checkpoints_dir) if checkpoints_dir else Path(bundles_dir) / "sweep-checkpoints"
    ck_dir.mkdir(parents=True, exist_ok=True)
    vanilla_ckpt = dense_checkpoint(model, ck_dir, model_config, weights, task)
    n_steps = len(s_values) + 1
    step = lambda i, what: (lambda m, f=None: say(f"{what}: {m}", None if f is None else 0.3 * (i + f) / n_steps))  # noqa: E731
    points = []
    for i, s in enumerate(s_values, start=1):
        ck_path = ck_dir / f"{Path(vanilla_ckpt).stem}-s{s:g}.safetensors"
        tuned = _finetuned_path(vanilla_ckpt, ck_path, finetune_steps) if finetune_steps > 0 else None
        if tuned is None or not tuned.is_file():
            say(f"factorizing at s={s:g}", 0.3 * i / n_steps)
            factorize_checkpoint(vanilla_ckpt, s, ck_path)
        if tuned is not None:
            ck_path = _finetune(ck_path, tuned, s, finetune_steps, step(i, f"fine-tuning s={s:g}"))
        points.append(SweepPoint(f"s={s:g}", s, str(ck_path)))
    return evaluate_points(vanilla_ckpt, points, tgt, prec, chosen, calibration=calibration, bundles_dir=bundles_dir,
                           config=config, force=force, labels=labels,
                           progress=lambda m, f=None: say(m, None if f is None else 0.3 + 0.7 * f))


def sweep_backend(target: str | Target, precision: str | None, backend: str | None) -> tuple[Target, str, str]:
    """(target, precision, backend) of a sweep or plan: the precision's first backend unless one is named."""
    tgt = target if isinstance(target, Target) else load_target(target)
    prec = tgt.check_precision(precision or tgt.default_precision)
    usable = [b for b in tgt.backends if prec in BACKENDS[b].precisions]
    chosen = backend or (usable[0] if usable else tgt.backend)
    if chosen not in usable:
        raise ConfigError(f"target {tgt.name} builds no {chosen} artifact at {prec}",
                          f"choose --backend from: {', '.join(usable) or 'none'}")
    return tgt, prec, chosen


def evaluate_points(
    vanilla_ckpt: str | os.PathLike[str],
    candidates: Sequence[SweepPoint],
    tgt: Target,
    prec: str,
    chosen: str,
    *,
    calibration: str = "fundus-demo",
    bundles_dir: str | os.PathLike[str] = "bundles",
    config: MeasureConfig | None = None,
    force: bool = False,
    labels: bool | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Build the vanilla model and every candidate checkpoint, check them against vanilla, profile all in one run.

    What the sweep and ``sfedge plan`` share: each candidate (uniform s or a
    plan) becomes a bundle for ``tgt`` at ``prec``, its ``chosen`` artifact is
    compared with the vanilla model on the held-out inputs, held-out Dice is
    computed where the data has labels, and every built configuration is
    measured in one rotating run with the vanilla bundle (paired ratios).  A
    candidate whose build fails keeps its one-line error.
    """
    say = progress or (lambda message, fraction=None: None)
    config = config or MeasureConfig()
    n_steps = len(candidates) + 1
    step = lambda i, what: (lambda m, f=None: say(f"{what}: {m}", None if f is None else 0.6 * (i + f) / n_steps))  # noqa: E731
    say("building the vanilla bundle", 0.0)
    vanilla = build_bundle(vanilla_ckpt, tgt, prec, calibration=calibration, out_dir=bundles_dir, force=force,
                           progress=step(0, "vanilla"))
    points = [_point("vanilla", None, vanilla_ckpt, vanilla.bundle, "vanilla")]
    built = {id(points[0]): vanilla.bundle}
    for i, cand in enumerate(candidates, start=1):
        try:
            result = build_bundle(cand.checkpoint, tgt, prec, calibration=calibration, out_dir=bundles_dir, force=force,
                                  progress=step(i, cand.name))
        except SfedgeError as e:
            cand.error = str(e)
            points.append(cand)
            continue
        point = _point(cand.name, cand.s, cand.checkpoint, result.bundle, cand.kind)
        point.predicted_ms = cand.predicted_ms
        built[id(point)] = result.bundle
        points.append(point)

    say("checking agreement with the vanilla model", 0.62)
    _quality_vs_vanilla([p for p in points if id(p) in built], built, vanilla.bundle, chosen)
    if labels is None:
        labels = has_labels(vanilla_ckpt)
    if labels:
        say("held-out Dice on the labels", 0.66)
        _holdout_dice(points)

    measured = [p for p in points if id(p) in built]
    subjects = [subjects_from(built[id(p)].path, chosen)[0] for p in measured]
    for p, subj in zip(measured, subjects):
        subj.label = f"{p.name} {subj.backend} {subj.precision}"
    report = None
    notes: list[str] = []
    if len(subjects) >= 2:
        measurements, pairings = measure_group(
            subjects, 0, config, lambda m, f=None: say(m, None if f is None else 0.7 + 0.3 * f))
        report = Report.create(measurements, pairings, config)
        _attach_latency(measured, measurements, pairings)
        notes = list(report.notes)
    else:
        notes.append("fewer than two configurations were built, so nothing was measured")
    name = Path(vanilla_ckpt).stem
    return SweepResult(name, tgt.name, prec, chosen, points, report, notes)


def dense_checkpoint(model: str | os.PathLike[str], folder: Path, config: Mapping[str, Any] | None = None,
                     weights: str | os.PathLike[str] | None = None, task: str | None = None) -> Path:
    """The dense checkpoint to factorize: a path, a demo model name (trained on first use), or a spec saved once in ``folder``."""
    p = Path(model)
    if str(model) in DEMO_MODELS and not (config or weights):
        p = demo_checkpoints()[str(model)]
    elif p.suffix != ".safetensors":
        ck = resolve_model(model, config=config, weights=weights, task=task)
        if ck.input_shape is not None:
            raise ConfigError(f"{model} is a torch.export program, which sfedge cannot factorize",
                              "sweep the model's code instead: FILE.py:factory --weights WEIGHTS")
        p = folder / f"{ck.name}-{ck.weights_sha256[:8]}-dense.safetensors"
        if not p.is_file():
            save_checkpoint(ck.model, p, preprocessing=ck.preprocessing, metrics=ck.metrics, task=ck.task)
    header = read_checkpoint_header(p)  # raises CheckpointError for a missing or foreign file
    if json.loads(header.get("config", "{}")).get("conv") == "sfconv":
        raise ConfigError(f"{p} is already an SFConv model", "give the vanilla (dense) checkpoint to sweep from")
    return p


def _finetuned_path(vanilla: Path, factorized: Path, steps: int) -> Path:
    """Where the fine-tuned checkpoint is cached: keyed by the vanilla weights' hash, s and steps."""
    tag = read_checkpoint_header(vanilla)["weights_sha256"][:8]
    return factorized.with_name(f"{factorized.stem}-ft{steps}-{tag}.safetensors")


def _finetune(factorized: Path, out: Path, s: float, steps: int, say: Progress) -> Path:
    """``factorized`` fine-tuned ``steps`` steps on the fundus demo, saved as ``out`` (reused when it exists)."""
    if out.is_file():
        return out
    ck = load_checkpoint(factorized)
    config = TrainConfig(steps=steps, batch=8, crop=128, lr=1e-3)
    result = train(ck.model, config, progress=lambda step, loss: say(f"step {step}/{steps}", step / steps))
    save_checkpoint(ck.model, out, preprocessing=ck.preprocessing,
                    metrics={**ck.metrics, "finetune_steps": steps, "holdout_dice": result.dice,
                             "train_config": asdict(config), "s": s})
    return out


def has_labels(ckpt: str | os.PathLike[str]) -> bool:
    """Trained on the fundus demo's pseudo-labels (so held-out Dice means something)."""
    metrics = json.loads(read_checkpoint_header(ckpt).get("metrics") or "{}")
    return "holdout_dice" in metrics


def _point(name: str, s: float | None, ckpt: str | Path, bundle: Any, kind: str = "uniform") -> SweepPoint:
    m = bundle.manifest["model"]
    return SweepPoint(name, s, str(ckpt), kind, bundle=str(bundle.path), macs=m.get("macs"), params=m.get("params"))


def _quality_vs_vanilla(points: list[SweepPoint], built: dict[int, Any], vanilla: Any, backend: str) -> None:
    """Run each point's artifact on the held-out inputs and compare with the vanilla torch model's outputs."""
    inputs, reference = vanilla.reference()
    for p in points:
        bundle = built[id(p)]
        art = bundle.artifact(backend)
        p.parity = art.parity.as_dict() if art.parity else {}
        own_inputs, _ = bundle.reference()
        if own_inputs.shape != inputs.shape or not np.array_equal(own_inputs, inputs):
            p.error = "held-out inputs differ from the vanilla bundle's (different calibration set or size)"
            continue
        with runner_for(art.path, backend=backend, threads=bundle.manifest["target"].get("threads")) as runner:
            parity = measure(runner, inputs, reference, bundle.task)
        p.dice_agreement, p.max_abs_vs_vanilla, p.cosine_vs_vanilla = (
            parity.dice_agreement, parity.max_abs, parity.cosine)


def _holdout_dice(points: list[SweepPoint]) -> None:
    for p in points:  # the torch model's quality, so also for ranks whose build failed
        p.holdout_dice = holdout_dice(load_checkpoint(p.checkpoint).model)


def _attach_latency(points: list[SweepPoint], measurements: list[Measurement], pairings: list[Any]) -> None:
    by_label = {pr.candidate: pr for pr in pairings}
    for p, m in zip(points, measurements):
        s = m.summary
        p.median_ms, p.p90_ms, p.cv = s.median, s.p90, s.cv
        pr = by_label.get(m.label)
        if pr is not None:
            p.ratio, p.ratio_low, p.ratio_high = pr.ratio.ratio, pr.ratio.low, pr.ratio.high
