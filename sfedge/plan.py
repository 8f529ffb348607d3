"""`sfedge plan`: per layer, dense or SFConv and its rank, chosen from what the target measures.

The job, end to end (workstation side; the measuring runs in the profiler's
worker processes, here or on the device over SSH):

1. **latency table** (:func:`latency_table`): the model's conv layers alone
   at their real shapes, dense and at a grid of ranks, measured on the
   target's runtime, precision and threads, checked against whole models;
   cached per target (:mod:`sfedge.profile.latency_table`);
2. **accuracy proxy** per layer and rank (:func:`layer_distortion`): the
   output error of the model with only that layer truncated to that rank
   (``sensitivity``, measured on calibration images, the default), or the
   spectral energy the truncation drops (``energy``, from the weights alone);
3. **plan** (:func:`sfedge.planning.solve`): the least total distortion under
   the latency budget, ranks snapped to what the table shows is fast;
4. **fine-tune** by distillation from the dense model on calibration images
   with the flattening regularizer (no labels needed; :func:`distilled_checkpoint`);
   the plan is recorded in the checkpoint's metrics and, through it, in the
   bundle's manifest (``model.plan``);
5. **build and profile** the planned models with the vanilla model and
   uniformly factorized ones (fine-tuned the same way) in one rotating run:
   :func:`sfedge.sweep.evaluate_points`, the sweep's machinery, so planned and
   uniform points land on one Pareto plot.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfedge.bundle import load_bundle
from sfedge.calibration import CalibrationSet, load_calibration
from sfedge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sfedge.console import table as rich_table
from sfedge.errors import ConfigError, SfedgeError
from sfedge.fileio import atomic_dir, sha256_bytes, write_json
from sfedge.latency_models import make_kit, model_key
from sfedge.models import input_shape
from sfedge.nn import SFConv2d, factorize, factorized_ranks, fold, rank_for
from sfedge.parity import compare_outputs
from sfedge.planning import LayerChoices, Option, Plan, fastest_ms, snap, solve
from sfedge.profile.latency_table import TABLE_MEASURE, LatencyTable, cache_root, load_table, measure_kit
from sfedge.profile.layers import compare_layers, profile_from_table
from sfedge.profile.remote import RemoteOptions, profile_remote
from sfedge.profile.report import load_report
from sfedge.profile.tables import markdown_page, markdown_table
from sfedge.profile.types import MeasureConfig, Subject
from sfedge.progress import Progress
from sfedge.source import resolve_model
from sfedge.sweep import SweepPoint, SweepResult, dense_checkpoint, evaluate_points, has_labels, sweep_backend
from sfedge.targets import Target, load_target
from sfedge.train import TrainConfig, train

__all__ = [
    "PLAN_TRAIN", "PROXIES", "PlanResult", "latency_table", "cached_layer_ms", "layer_distortion", "cached_distortion",
    "layer_choices", "min_dice_plan",
    "make_plans", "distilled_checkpoint", "plan", "table_layer_comparisons", "table_cache_path", "OUTPUT_KIND",
]

OUTPUT_KIND = "plan"  # the -o marker (sfedge.fileio.check_output_dir): a plan folder replaces only a plan folder

# The fine-tune every planned and uniform model gets (distillation from the dense model, flattening regularizer).
PLAN_TRAIN = TrainConfig(steps=300, batch=8, crop=128, lr=1e-3, flatness_weight=1e-3)
PROXIES = ("sensitivity", "energy")
SENSITIVITY_SAMPLES = 4
SENSITIVITY_CROP = 128


# -- the latency table -----------------------------------------------------------------------------------------


def _threads(tgt: Target, config: MeasureConfig | None) -> int | None:
    return (config.threads if config and config.threads else None) or tgt.threads


def table_cache_path(key: str, target: str, backend: str, precision: str, threads: int | None) -> Path:
    """Where the workstation keeps a model's table for one target, backend, precision and thread count."""
    return cache_root() / "latency" / "tables" / target / f"{key}-{backend}-{precision}-t{threads or 0}.json"


def _local_runtime(backend: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in {"onnxruntime": ("onnxruntime",), "tflite": ("ai-edge-litert", "tflite-runtime")}.get(backend, ()):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def latency_table(
    model: str | os.PathLike[str] | Checkpoint,
    target: str | Target,
    *,
    backend: str | None = None,
    precision: str | None = None,
    config: MeasureConfig | None = None,
    remote: Sequence[str] = (),
    remote_options: RemoteOptions | None = None,
    refresh: bool = False,
    calibration: CalibrationSet | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> LatencyTable:
    """The latency table of ``model`` (dense) on ``target``: from the cache, or made and measured now.

    Measured here unless ``remote`` names an SSH host: then the kit (the
    small models, made here) is copied there and measured with the
    runtime-only install, exactly like ``sfedge profile --remote``.  A cached
    table is reused when its runtime version matches this machine's (a table
    measured on a remote device is reused for that target as long as it is
    cached; ``refresh`` measures again).
    """
    say = progress or (lambda message, fraction=None: None)
    ckpt = model if isinstance(model, Checkpoint) else resolve_model(model)
    tgt = target if isinstance(target, Target) else load_target(target)
    _, prec, chosen = sweep_backend(tgt, precision, backend)
    shape = input_shape(ckpt.config, tgt.input_size, ckpt.model)
    threads = _threads(tgt, config)
    key = model_key(ckpt, shape)
    path = table_cache_path(key, tgt.name, chosen, prec, threads)
    if path.is_file() and not refresh:
        try:
            cached = load_table(path)
            local = _local_runtime(chosen)
            if remote or not local or local in cached.runtime.values():
                say("latency table from the cache", 1.0)
                return cached
        except SfedgeError:
            pass
    if threads != tgt.threads:
        from dataclasses import replace

        tgt = replace(tgt, threads=threads)
    with tempfile.TemporaryDirectory(prefix="sfedge-kit-", dir=workdir) as tmp:
        kit = make_kit(ckpt, tgt, chosen, prec, Path(tmp) / f"kit-{ckpt.name}-{chosen}-{prec}", input_shape=shape,
                       calibration=calibration, progress=lambda m, f=None: say(f"kit: {m}", None if f is None else 0.3 * f))
        table = _measure(kit, config, remote, remote_options,
                         lambda m, f=None: say(f"table: {m}", None if f is None else 0.3 + 0.7 * f))
    table.save(path)
    return table


def _measure(kit: Path, config: MeasureConfig | None, remote: Sequence[str], options: RemoteOptions | None,
             say: Progress) -> LatencyTable:
    """Measure a kit here, or on the first remote host (its report brings the table back)."""
    measure_config = config or TABLE_MEASURE
    if not remote:
        return measure_kit(kit, measure_config, progress=say)
    with tempfile.TemporaryDirectory(prefix="sfedge-kit-report-") as out:
        results = profile_remote(list(remote)[:1], [kit], config=measure_config, out=Path(out), options=options,
                                 plots=False, progress=say)
        report = load_report(results[0].report_dir)
    if not report.table:
        raise SfedgeError(f"{remote[0]} measured the kit but returned no table",
                          "update sfedge on the device (--install) and retry")
    return LatencyTable.from_dict(report.table)


def cached_layer_ms(
    model: str | os.PathLike[str] | Checkpoint,
    target: str | Target,
    *,
    backend: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
) -> dict[str, float] | None:
    """{layer: measured ms} of ``model``'s conv layers as the model is (dense, or SFConv at its ranks), from a cached table.

    For cost-aware decisions elsewhere (mixed precision keeps the layers that
    cost least in float): None when no table was measured for this model's
    dense architecture on ``target`` (``sfedge plan`` makes one); never
    measures.  Layer names are module paths (``inc.0``).
    """
    ckpt = model if isinstance(model, Checkpoint) else resolve_model(model)
    tgt = target if isinstance(target, Target) else load_target(target)
    try:
        _, prec, chosen = sweep_backend(tgt, precision, backend)
    except ConfigError:
        return None
    shape = input_shape(ckpt.config, tgt.input_size, ckpt.model)
    path = table_cache_path(model_key(ckpt, shape), tgt.name, chosen, prec, threads or tgt.threads)
    if not path.is_file():
        return None
    try:
        table = load_table(path)
        return table.layer_ms(factorized_ranks(ckpt.model))
    except SfedgeError:
        return None


# -- the accuracy proxy ----------------------------------------------------------------------------------------


def _proxy_inputs(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """A few calibration images, centre-cropped to SENSITIVITY_CROP when the model runs on the crop (fast)."""
    x = torch.from_numpy(np.ascontiguousarray(images[:SENSITIVITY_SAMPLES], np.float32))
    h, w = x.shape[-2:]
    if min(h, w) > SENSITIVITY_CROP:
        y0, x0 = (h - SENSITIVITY_CROP) // 2, (w - SENSITIVITY_CROP) // 2
        crop = x[..., y0 : y0 + SENSITIVITY_CROP, x0 : x0 + SENSITIVITY_CROP].contiguous()
        try:
            with torch.no_grad():
                model(crop[:1])
            return crop
        except Exception:  # a model with a fixed input size (positional embeddings): use the full image
            pass
    return x


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def layer_distortion(
    model: nn.Module,
    layer_ranks: Mapping[str, Sequence[int]],
    *,
    proxy: str = "sensitivity",
    images: np.ndarray | None = None,
) -> dict[str, dict[int, float]]:
    """{layer: {rank: distortion}}: what truncating each layer alone to each rank costs the model's output.

    ``sensitivity``: the output's mean squared change over its variance when
    only that layer is replaced by its rank-r truncated SVD, on a few
    calibration ``images``; ``energy``: the fraction of the layer's spectral
    energy (squared singular values of the permuted weight) the truncation
    drops.  Both are 0 for dense and add up over layers in the planner.
    """
    if proxy not in PROXIES:
        raise ConfigError(f"unknown accuracy proxy '{proxy}'", f"valid proxies: {', '.join(PROXIES)}")
    model = model.eval()
    out: dict[str, dict[int, float]] = {}
    if proxy == "energy":
        for name, ranks in layer_ranks.items():
            w = model.get_submodule(name).weight.detach().double()
            co, ci, kh, kw = w.shape
            sv = torch.linalg.svdvals(w.permute(0, 2, 1, 3).reshape(co * kh, ci * kw))
            energy = torch.cumsum(sv**2, 0) / (sv**2).sum()
            out[name] = {int(r): float(1 - energy[min(int(r), len(energy)) - 1]) for r in ranks}
        return out
    if images is None:
        raise ConfigError("the sensitivity proxy needs calibration images", "pass --calibration, or --proxy energy")
    x = _proxy_inputs(model, images)
    ref = _first(model(x))
    scale = float(((ref - ref.mean()) ** 2).mean()) or 1.0
    for name, ranks in layer_ranks.items():
        conv = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        out[name] = {}
        try:
            for r in ranks:
                setattr(parent, child, SFConv2d.from_dense(conv, rank=int(r)))
                y = _first(model(x))
                out[name][int(r)] = float(((y - ref) ** 2).mean()) / scale
        finally:
            setattr(parent, child, conv)
    return out


def cached_distortion(ckpt: Checkpoint, layer_ranks: Mapping[str, Sequence[int]], proxy: str,
                      calibration: CalibrationSet | None) -> dict[str, dict[int, float]]:
    """:func:`layer_distortion`, cached by weights, proxy, ranks and calibration set (minutes for big models)."""
    payload = {"weights": ckpt.weights_sha256, "proxy": proxy, "ranks": {k: list(v) for k, v in layer_ranks.items()},
               "calibration": calibration.sha256 if calibration is not None and proxy == "sensitivity" else None,
               "samples": SENSITIVITY_SAMPLES, "crop": SENSITIVITY_CROP}
    key = sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:16]
    path = cache_root() / "latency" / "proxy" / f"{ckpt.name}-{proxy}-{key}.json"
    if path.is_file():
        try:
            return {k: {int(r): float(v) for r, v in d.items()} for k, d in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass
    result = layer_distortion(ckpt.model, layer_ranks, proxy=proxy,
                              images=calibration.calibration if calibration is not None else None)
    write_json(path, {k: {str(r): v for r, v in d.items()} for k, d in result.items()})
    return result


def layer_choices(table: LatencyTable, distortion: Mapping[str, Mapping[int, float]]) -> list[LayerChoices]:
    """The planner's input: per layer, dense and every measured rank with its time, MACs and distortion."""
    out = []
    for e in table.layers:
        options = [Option(None, e.dense_ms, 0.0, e.shape.macs())]
        options += [Option(r, t.ms, float(distortion.get(e.name, {}).get(r, 0.0)), e.shape.macs(r))
                    for r, t in sorted(e.ranks.items())]
        out.append(LayerChoices(e.name, options))
    return out


# -- plans -----------------------------------------------------------------------------------------------------


def _table_info(table: LatencyTable) -> dict[str, Any]:
    return {"target": table.target, "backend": table.backend, "precision": table.precision, "threads": table.threads,
            "runtime": table.runtime, "model_key": table.model_key, "stated_error": table.stated_error,
            "whole_dense_ms": table.whole_dense_ms, "created": table.created}


def make_plans(
    table: LatencyTable,
    distortion: Mapping[str, Mapping[int, float]],
    *,
    budgets_ms: Sequence[float] = (),
    speedups: Sequence[float] = (),
    proxy: str = "sensitivity",
) -> list[Plan]:
    """One plan per budget (ms) and per speed-up over the dense model (as the table predicts it)."""
    choices = layer_choices(table, distortion)
    info = _table_info(table)
    plans = [solve(choices, table.rest_ms, b, goal=f"budget {b:g} ms", proxy=proxy, table=info) for b in budgets_ms]
    for x in speedups:
        if x <= 0:
            raise ConfigError(f"--speedup {x} must be positive", "e.g. --speedup 2")
        plans.append(solve(choices, table.rest_ms, table.whole_dense_ms / x, goal=f"speed-up {x:g}x", proxy=proxy,
                           table=info))
    return plans


@torch.no_grad()
def _agreement(dense: nn.Module, ranks: Mapping[str, int], images: np.ndarray, task: str) -> float:
    """Mask Dice agreement of the truncated (not fine-tuned) model with the dense one on calibration images."""
    model = copy.deepcopy(dense).eval()
    if ranks:
        factorize(model, ranks=dict(ranks))
    x = torch.from_numpy(np.ascontiguousarray(images[:8], np.float32))
    ref, out = _first(dense(x)).numpy(), _first(model(x)).numpy()
    agreement = compare_outputs(ref, out, task).dice_agreement
    return 1.0 if agreement is None else float(agreement)


def min_dice_plan(table: LatencyTable, distortion: Mapping[str, Mapping[int, float]], dense: nn.Module,
                  images: np.ndarray, task: str, min_dice: float, proxy: str, steps: int = 9) -> Plan:
    """The fastest plan whose truncated model agrees with the dense one at mask Dice >= ``min_dice``.

    Candidates are the planner's optimum at ``steps`` budgets from the
    fastest reachable to the dense model's time; each is judged *before*
    fine-tuning (on calibration images), so the choice is conservative: the
    fine-tune only raises agreement.
    """
    if not 0 < min_dice <= 1:
        raise ConfigError(f"--min-dice {min_dice} is not in (0, 1]", "e.g. --min-dice 0.9")
    choices = layer_choices(table, distortion)
    info = _table_info(table)
    lo = fastest_ms([LayerChoices(c.name, snap(c.options)) for c in choices], table.rest_ms)
    seen: set[str] = set()
    last: Plan | None = None
    for b in np.linspace(lo * 1.001, table.whole_dense_ms, steps):
        p = solve(choices, table.rest_ms, float(b), goal=f"min-dice {min_dice:g}", proxy=proxy, table=info)
        key = json.dumps(p.ranks(), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        last = p
        agreement = _agreement(dense, p.ranks(), images, task)
        if agreement >= min_dice:
            p.goal += f" (truncated model agrees at {agreement:.4f} before fine-tuning)"
            return p
    assert last is not None
    raise ConfigError(f"no plan reaches mask Dice {min_dice:g} with the dense model before fine-tuning "
                      f"(the slowest candidate, {last.predicted_ms:.3f} ms, did not)",
                      "lower --min-dice, or plan by --budget-ms / --speedup and fine-tune")


# -- fine-tuning -----------------------------------------------------------------------------------------------


def distilled_checkpoint(
    dense_path: str | os.PathLike[str],
    ranks: Mapping[str, int],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    steps: int,
    calibration: CalibrationSet,
    train_config: TrainConfig = PLAN_TRAIN,
    metrics: Mapping[str, Any] | None = None,
    labels: bool = False,
    progress: Progress | None = None,
) -> Path:
    """The dense model factorized to ``ranks`` and fine-tuned ``steps`` by distillation from it (cached).

    Label-free: the loss is the distance to the dense model's outputs on
    random crops of the calibration images, plus the flattening regularizer.
    The checkpoint records its ranks (it rebuilds alone), the plan or s in
    ``metrics``, and held-out Dice where the data has labels (``labels``).
    """
    say = progress or (lambda message, fraction=None: None)
    dense = load_checkpoint(dense_path)
    config = TrainConfig(**{**asdict(train_config), "steps": max(0, int(steps))})
    payload = {"dense": dense.weights_sha256, "ranks": dict(sorted(ranks.items())), "train": config.key(),
               "calibration": calibration.sha256}
    key = sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:10]
    path = Path(out_dir) / f"{Path(dense_path).stem}-{name}-{key}-ft{config.steps}.safetensors"
    if path.is_file():
        return path
    student = copy.deepcopy(dense.model)
    if ranks:
        factorize(student, ranks=dict(ranks))
    task = dense.task or "binary"
    result = None
    if config.steps > 0:
        torch.manual_seed(config.seed)
        result = train(student, config, teacher=dense.model, images=calibration.calibration, task=task,
                       evaluate=labels, progress=lambda s, loss: say(f"{name}: step {s}/{config.steps}", s / config.steps))
    for p in student.parameters():
        p.data = p.data.contiguous()
    record = {**dict(metrics or {}), "finetune": {"steps": config.steps, "mode": "distillation from the dense model",
                                                  "train_config": asdict(config), "teacher": dense.weights_sha256}}
    if result is not None and result.dice is not None:
        record["holdout_dice"] = result.dice
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_checkpoint(student.eval(), path, preprocessing=dense.preprocessing, metrics=record, task=dense.task,
                    record_factorization=True)
    return path


# -- the whole job ---------------------------------------------------------------------------------------------


@dataclass
class PlanResult:
    """Plans, the table they came from, and the measured comparison (planned and uniform points, one run)."""

    model: str
    target: str
    precision: str
    backend: str
    table: LatencyTable
    plans: list[Plan]
    checkpoints: list[str] = field(default_factory=list)
    comparison: SweepResult | None = None
    notes: list[str] = field(default_factory=list)

    def predicted_vs_measured(self) -> list[dict[str, Any]]:
        """For every measured point with a prediction: predicted ms, measured ms (paired with vanilla) and the error."""
        if self.comparison is None:
            return []
        vanilla = next((p for p in self.comparison.points if p.kind == "vanilla"), None)
        rows = []
        for p in self.comparison.points:
            if p.predicted_ms is None or p.ratio is None or vanilla is None or vanilla.median_ms is None:
                continue
            # measured on the table's scale: the vanilla model's table time times the paired ratio
            measured = self.table.whole_dense_ms * p.ratio
            rows.append({"name": p.name, "kind": p.kind, "predicted_ms": p.predicted_ms, "measured_ms": measured,
                         "measured_median_ms": p.median_ms, "ratio": p.ratio,
                         "predicted_ratio": p.predicted_ms / self.table.whole_dense_ms,
                         "error": p.predicted_ms / measured - 1})
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"schema": "sfedge-plan-result/1", "model": self.model, "target": self.target,
                "precision": self.precision, "backend": self.backend, "plans": [p.as_dict() for p in self.plans],
                "checkpoints": self.checkpoints, "table": self.table.as_dict(),
                "comparison": self.comparison.as_dict() if self.comparison else None,
                "predicted_vs_measured": self.predicted_vs_measured(), "notes": self.notes}

    def markdown(self, figure: str | None = None) -> str:
        lines = [f"# Plan: {self.model} on {self.target} ({self.backend} {self.precision})", ""]
        for plan, ck in zip(self.plans, self.checkpoints):
            lines += [f"## {plan.goal}", "", f"Checkpoint: `{ck}`", "", *plan.markdown(), ""]
        pvm = self.predicted_vs_measured()
        if pvm:
            lines += ["## Predicted vs measured", "",
                      "Measured = the table's vanilla time x the paired ratio to vanilla from the profile run.", "",
                      *markdown_table(["model", "predicted ms", "measured ms", "error"],
                                      [[r["name"], f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}",
                                        f"{r['error']:+.1%}"] for r in pvm]), ""]
        if self.comparison is not None:
            header, rows = self.comparison._table()
            lines += ["## Planned and uniform models, measured together", "", *markdown_table(header, rows), ""]
        lines += ["## Latency table", "", *self.table.markdown()]
        return markdown_page(lines, [figure] if figure else [], self.notes)

    def tables(self) -> list[Any]:
        out = [rich_table(f"{p.goal}: predicted {p.predicted_ms:.3f} ms", list(Plan.HEADER), p.rows()) for p in self.plans]
        if self.comparison is not None:
            out += self.comparison.tables()
        return out

    def write(self, folder: str | os.PathLike[str], plots: bool = True) -> Path:
        """plan.json, plan.md, table.json and (when measured) the comparison (sweep.* and profile/) into ``folder``."""
        folder = Path(folder)
        with atomic_dir(folder, kind=OUTPUT_KIND) as tmp:
            figure = None
            if self.comparison is not None:
                self.comparison.write(tmp / "comparison", plots=plots)
                if (tmp / "comparison" / "sweep.png").is_file():
                    figure = "comparison/sweep.png"
            write_json(tmp / "plan.json", self.as_dict())
            self.table.save(tmp / "table.json")
            (tmp / "plan.md").write_text(self.markdown(figure))
        return folder


def _plan_name(p: Plan) -> str:
    return "plan-" + p.goal.split(" (")[0].replace(" ", "").replace("budget", "").replace("speed-up", "x") \
        .replace("min-dice", "dice")


def plan(
    model: str | os.PathLike[str],
    target: str,
    *,
    budgets_ms: Sequence[float] = (),
    speedups: Sequence[float] = (),
    min_dice: float | None = None,
    precision: str | None = None,
    backend: str | None = None,
    proxy: str = "sensitivity",
    finetune_steps: int = PLAN_TRAIN.steps,
    compare_s: Sequence[float] = (0.5, 0.25),
    calibration: str = "fundus-demo",
    bundles_dir: str | os.PathLike[str] = "bundles",
    checkpoints_dir: str | os.PathLike[str] | None = None,
    config: MeasureConfig | None = None,
    table_config: MeasureConfig | None = None,
    remote: Sequence[str] = (),
    remote_options: RemoteOptions | None = None,
    refresh_table: bool = False,
    measure: bool = True,
    force: bool = False,
    labels: bool | None = None,
    model_config: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    task: str | None = None,
    progress: Progress | None = None,
) -> PlanResult:
    """Plan ``model`` (the dense model: checkpoint, demo name or spec) for ``target``; fine-tune, build, profile.

    Give at least one of ``budgets_ms``, ``speedups`` or ``min_dice``.
    ``compare_s``: uniform s points measured in the same run (fine-tuned
    with the same steps); ``measure=False`` stops after the plans and their
    checkpoints (no bundles, no profile).  The latency table is measured on
    ``remote[0]`` when given (``--remote``); the comparison profile runs here.
    """
    say = progress or (lambda message, fraction=None: None)
    if not budgets_ms and not speedups and min_dice is None:
        raise ConfigError("give a goal: --budget-ms, --speedup or --min-dice", "e.g. sfedge plan unet --speedup 2")
    tgt, prec, chosen = sweep_backend(target, precision, backend)
    ck_dir = Path(checkpoints_dir) if checkpoints_dir else Path(bundles_dir) / "plan-checkpoints"
    ck_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    dense_path = dense_checkpoint(model, ck_dir, model_config, weights, task)
    torch.set_num_threads(threads)  # the demo's loader sets its own training threads; keep the caller's
    dense = load_checkpoint(dense_path)
    shape = input_shape(dense.config, tgt.input_size, dense.model)
    calib = load_calibration(calibration, size=shape[2:])
    say("latency table", 0.0)
    table = latency_table(dense, tgt, backend=chosen, precision=prec, config=table_config, remote=remote,
                          remote_options=remote_options, refresh=refresh_table, calibration=calib,
                          progress=lambda m, f=None: say(m, None if f is None else 0.4 * f))
    say(f"accuracy proxy ({proxy})", 0.4)
    distortion = cached_distortion(dense, {e.name: sorted(e.ranks) for e in table.layers}, proxy,
                                    calib if proxy == "sensitivity" else None)
    plans = make_plans(table, distortion, budgets_ms=budgets_ms, speedups=speedups, proxy=proxy)
    task_name = dense.task or "binary"
    if min_dice is not None:
        plans.append(min_dice_plan(table, distortion, dense.model, calib.calibration, task_name, min_dice, proxy))
    if labels is None:
        labels = has_labels(dense_path)
    result = PlanResult(Path(dense_path).stem, tgt.name, prec, chosen, table, plans)
    candidates: list[SweepPoint] = []
    n = len(plans) + len(compare_s)
    for i, p in enumerate(plans):
        name = _plan_name(p)
        say(f"fine-tuning {name}", 0.45 + 0.25 * i / max(1, n))
        ck = distilled_checkpoint(dense_path, p.ranks(), ck_dir, name=name, steps=finetune_steps, calibration=calib,
                                  metrics={"plan": p.as_dict()}, labels=labels,
                                  progress=lambda m, f=None: say(m, None))
        result.checkpoints.append(str(ck))
        candidates.append(SweepPoint(name, None, str(ck), "planned", predicted_ms=p.predicted_ms))
    layers = {e.name: e.shape for e in table.layers}
    for j, s in enumerate(compare_s):
        ranks = {k: rank_for(s, sh.in_channels, sh.out_channels) for k, sh in layers.items()}
        say(f"fine-tuning uniform s={s:g}", 0.45 + 0.25 * (len(plans) + j) / max(1, n))
        ck = distilled_checkpoint(dense_path, ranks, ck_dir, name=f"s{s:g}", steps=finetune_steps, calibration=calib,
                                  metrics={"s": s}, labels=labels, progress=lambda m, f=None: say(m, None))
        candidates.append(SweepPoint(f"s={s:g}", s, str(ck), "uniform", predicted_ms=table.predict(ranks)))
    if measure:
        result.comparison = evaluate_points(dense_path, candidates, tgt, prec, chosen, calibration=calibration,
                                            bundles_dir=bundles_dir, config=config, force=force, labels=labels,
                                            progress=lambda m, f=None: say(m, None if f is None else 0.7 + 0.3 * f))
        for p in result.comparison.points:
            if p.kind == "vanilla":
                p.predicted_ms = table.whole_dense_ms
        result.notes += result.comparison.notes
        stated = table.stated_error
        for row in result.predicted_vs_measured():
            if stated is not None and abs(row["error"]) > max(stated, 0.15):
                result.notes.append(f"{row['name']}: the table predicted {row['predicted_ms']:.3f} ms, the profile run "
                                    f"measured {row['measured_ms']:.3f} ms ({row['error']:+.1%}; the table's validation "
                                    f"error was {stated:.1%}); run `sfedge profile --layers` on the two bundles to see "
                                    "which layers differ")
    return result


# -- TFLite per-layer profiles (`sfedge profile --layers`) ---------------------------------------------------------


def table_layer_comparisons(
    pairs: Sequence[tuple[Subject, Subject]],
    config: MeasureConfig | None = None,
    *,
    remote: Sequence[str] = (),
    remote_options: RemoteOptions | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Per-layer comparisons of bundle pairs from per-layer models (for runtimes without a profiler: TFLite).

    Each layer of the candidate runs alone at its real input shape and rank,
    paired with the baseline's dense layer (a latency kit made from the
    baseline's checkpoint, restricted to the candidate's ranks; cached shapes
    are reused).  Needs the bundles' checkpoints on this machine.
    """
    out = []
    for cand, base in pairs:
        cb, bb = load_bundle(cand.meta["bundle"]), load_bundle(base.meta["bundle"])
        paths = [b.manifest["model"].get("checkpoint") for b in (cb, bb)]
        if not all(p and Path(p).is_file() for p in paths):
            raise SfedgeError(f"per-layer TFLite times need the checkpoints the bundles were built from "
                              f"({paths[0]}, {paths[1]}), which are not on this machine",
                              "run `sfedge profile --layers` on the workstation that built them (with --remote for "
                              "a device)")
        cand_ck, base_ck = load_checkpoint(paths[0]), load_checkpoint(paths[1])
        if factorized_ranks(base_ck.model):
            base_ck = _dense_twin(base_ck)
        ranks = factorized_ranks(cand_ck.model)
        tgt = _bundle_target(cb)
        shape = tuple(cb.manifest["model"]["input_shape"])
        with tempfile.TemporaryDirectory(prefix="sfedge-layer-kit-") as tmp:
            kit = make_kit(base_ck, tgt, cand.backend, cand.precision, Path(tmp) / "kit", input_shape=shape,  # type: ignore[arg-type]
                           validation=(), layer_ranks={k: [v] for k, v in ranks.items()},
                           extra_whole={"candidate": ranks})
            table = _measure(kit, config or TABLE_MEASURE, remote, remote_options,
                             progress or (lambda message, fraction=None: None))
        measured = {v["name"]: v["measured_ms"] for v in table.validation}
        a = profile_from_table(table, ranks, cand.label, measured.get("candidate"))
        b = profile_from_table(table, {}, base.label, measured.get("dense"))
        out.append(compare_layers(a, b))
    return out


def _bundle_target(bundle: Any) -> Target:
    """The target a bundle was built for, from its manifest (so a kit is made for the same threads and layout)."""
    t = bundle.manifest["target"]
    return Target(t["name"], t.get("description", ""), tuple(t["backends"]), tuple(t["precisions"]),
                  t["default_precision"], t["layout"], int(t["threads"]), tuple(t["input_size"]))  # type: ignore[arg-type]


def _dense_twin(ckpt: Checkpoint) -> Checkpoint:
    """A factorized checkpoint's dense twin (its SFConv layers folded; latency only: weights are the folded ones)."""
    model = copy.deepcopy(ckpt.model)
    fold(model)
    name = ckpt.name.removesuffix("-sfconv")
    config = {**ckpt.config, "conv": "dense"} if "conv" in ckpt.config else dict(ckpt.config)
    return Checkpoint(model=model, name=name, config=config, weights_sha256=ckpt.weights_sha256, source=ckpt.source)
