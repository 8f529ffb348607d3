"""Latency tables: what each conv layer of a model costs on the target, dense and as SFConv at a grid of ranks.

Measured the profiler's way (device side: numpy and the runtime only).  The
workstation makes a *kit* (:mod:`sfedge.latency_models`): one small model per
conv layer shape (the conv + ReLU at the layer's real input shape, dense and
SFConv at each rank of the grid), and whole models (the dense model and a few
uniformly factorized ones) to check the table against.  Here the kit is
measured:

1. **per shape**, the dense conv and every rank in one rotating run of the
   profiler's workers (:func:`sfedge.profile.schedule.measure_group`), so each
   rank's time is a *paired* ratio to the dense conv with a bootstrap CI.
   Shapes are cached per target, runtime version, precision, threads and
   shape (:func:`shape_cache_dir`), so a second model sharing a shape, or a
   second run, measures only what is new;
2. **per model**, one rotating run of the whole dense model, the whole
   validation models and every shape's dense conv: the absolute scale.  Each
   rank's time is its shape's dense time from this run times its paired ratio.

The prediction for any choice of ranks is ``rest + sum(layer times)``, where
``rest`` is the whole dense model minus its layers' isolated dense times: the
layers no plan changes (pooling, upsampling, concatenations, the head) plus the
per-model overhead the isolated layers carry.  The dense model is therefore
predicted exactly by construction; what the table *claims* is the difference a
choice of ranks makes, and the validation models (measured whole, paired with
the dense model in the same run) say how well it does: the table's stated
error is the largest relative error among them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.registry import runner_class
from sfedge.errors import ConfigError, SfedgeError
from sfedge.fileio import atomic_path, read_schema_json, write_json
from sfedge.profile.report import host_info
from sfedge.profile.schedule import measure_group
from sfedge.profile.tables import latency_table_markdown
from sfedge.profile.types import MeasureConfig, Measurement, Pairing, Subject
from sfedge.progress import Progress

__all__ = [
    "ConvShape", "RankTime", "TableLayer", "LatencyTable", "KIT_SCHEMA", "TABLE_SCHEMA", "KIT_FILE",
    "TABLE_MEASURE", "is_kit", "load_kit", "measure_kit", "shape_cache_dir", "cache_root", "load_table",
    "write_kit_index", "kit_subjects", "predicted_vs",
]

KIT_SCHEMA = "sfedge-latency-kit/1"
TABLE_SCHEMA = "sfedge-latency-table/1"
KIT_FILE = "kit.json"
# Per-layer models run in 0.05-5 ms: half a second per configuration gives hundreds of samples; one process each
# (the kit has a hundred configurations; the per-shape pairing, not process replicas, is what keeps ratios honest).
TABLE_MEASURE = MeasureConfig(runs=30, min_seconds=0.3, warmup_seconds=0.2, processes=1)


@dataclass(frozen=True)
class ConvShape:
    """What a kxk conv layer's latency depends on: channels, kernel, stride, padding, dilation, input size."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    input_hw: tuple[int, int] = (1, 1)
    bias: bool = True

    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``c16-32_k3x3_s1x1_p1x1_d1x1_128x128``."""
        k, s, p, d, hw = self.kernel, self.stride, self.padding, self.dilation, self.input_hw
        return (f"c{self.in_channels}-{self.out_channels}_k{k[0]}x{k[1]}_s{s[0]}x{s[1]}_p{p[0]}x{p[1]}_d{d[0]}x{d[1]}_"
                f"{hw[0]}x{hw[1]}" + ("" if self.bias else "_nobias"))

    @property
    def output_hw(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (self.input_hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2))

    @property
    def max_rank(self) -> int:
        """The factorization's largest rank: min(Co kh, Ci kw)."""
        return min(self.out_channels * self.kernel[0], self.in_channels * self.kernel[1])

    def macs(self, rank: int | None = None) -> int:
        """Multiply-adds at batch 1, dense (``rank`` None) or SFConv (the 1xk conv at the input height)."""
        h, (oh, ow) = self.input_hw[0], self.output_hw
        kh, kw = self.kernel
        if rank is None:
            return oh * ow * self.out_channels * self.in_channels * kh * kw
        mid_w = ow  # conv A carries the width stride and padding, conv B the height's
        return h * mid_w * rank * self.in_channels * kw + oh * ow * self.out_channels * rank * kh

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvShape:
        return cls(int(d["in_channels"]), int(d["out_channels"]), tuple(d["kernel"]), tuple(d["stride"]),  # type: ignore[arg-type]
                   tuple(d["padding"]), tuple(d["dilation"]), tuple(d["input_hw"]), bool(d.get("bias", True)))


@dataclass
class RankTime:
    """One rank of one layer: its time on the model's scale, and its paired ratio to the dense conv (with CI)."""

    ms: float
    ratio: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class TableLayer:
    """One conv layer of the model: its shape, its dense time and its time at every measured rank."""

    name: str
    shape: ConvShape
    dense_ms: float
    ranks: dict[int, RankTime]

    def ms(self, rank: int | None) -> float:
        """Time as dense (None) or at ``rank``; a rank between measured ones is interpolated linearly."""
        if rank is None:
            return self.dense_ms
        if rank in self.ranks:
            return self.ranks[rank].ms
        known = sorted(self.ranks)
        if not known:
            raise ConfigError(f"the latency table has no SFConv time for layer {self.name}", "re-measure the table")
        return float(np.interp(rank, known, [self.ranks[r].ms for r in known]))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape.as_dict(), "dense_ms": self.dense_ms,
                "dense_macs": self.shape.macs(), "ranks": {str(r): {**t.as_dict(), "macs": self.shape.macs(r)}
                                                            for r, t in sorted(self.ranks.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableLayer:
        return cls(d["name"], ConvShape.from_dict(d["shape"]), float(d["dense_ms"]),
                   {int(r): RankTime(float(t["ms"]), float(t["ratio"]), float(t["low"]), float(t["high"]))
                    for r, t in d["ranks"].items()})


@dataclass
class LatencyTable:
    """Per-layer latency of one model on one target, runtime, precision and thread count."""

    model: str
    model_key: str
    target: str
    backend: str
    precision: str
    threads: int | None
    runtime: dict[str, str]
    layers: list[TableLayer]
    whole_dense_ms: float
    rest_ms: float
    validation: list[dict[str, Any]] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    shapes_measured: int = 0
    shapes_cached: int = 0
    notes: list[str] = field(default_factory=list)
    schema: str = TABLE_SCHEMA

    def layer(self, name: str) -> TableLayer:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise ConfigError(f"layer {name} is not in the latency table of {self.model}",
                          f"the table has: {', '.join(e.name for e in self.layers[:6])} ...")

    def layer_ms(self, ranks: Mapping[str, int | None] | None = None) -> dict[str, float]:
        """{layer: ms} for a choice of ranks (layers not in ``ranks`` dense): what a layer costs on this target."""
        ranks = ranks or {}
        unknown = sorted(set(ranks) - {e.name for e in self.layers})
        if unknown:
            raise ConfigError(f"layers {', '.join(unknown[:3])} are not in the latency table of {self.model}",
                              "the ranks come from another model; make its table with `sfedge plan`")
        return {e.name: e.ms(ranks.get(e.name)) for e in self.layers}

    def predict(self, ranks: Mapping[str, int | None] | None = None) -> float:
        """Predicted whole-model median (ms) with ``ranks`` ({layer: rank}; the others dense)."""
        return self.rest_ms + sum(self.layer_ms(ranks).values())

    @property
    def stated_error(self) -> float | None:
        """The error the table claims: its worst on the uniform validation models, rounded up to the next 5%.

        Only the uniformly factorized models (``s=...``) state it; other whole
        models measured with the kit (a plan, a bundle's configuration) are
        predictions checked *against* it.  None when none were measured.
        """
        errors = [abs(v["error"]) for v in self.validation if v.get("error") is not None and v["name"].startswith("s=")]
        if not errors:
            return None
        return max(0.05, math.ceil(max(errors) / 0.05 - 1e-9) * 0.05)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "model": self.model, "model_key": self.model_key, "target": self.target,
            "backend": self.backend, "precision": self.precision, "threads": self.threads, "runtime": self.runtime,
            "whole_dense_ms": self.whole_dense_ms, "rest_ms": self.rest_ms, "stated_error": self.stated_error,
            "validation": self.validation, "device": self.device, "config": self.config, "created": self.created,
            "shapes_measured": self.shapes_measured, "shapes_cached": self.shapes_cached, "notes": self.notes,
            "layers": [e.as_dict() for e in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        if d.get("schema") != TABLE_SCHEMA:
            raise SfedgeError(f"not an sfedge latency table (schema {d.get('schema')!r})", "re-measure it with `sfedge plan`")
        return cls(d["model"], d["model_key"], d["target"], d["backend"], d["precision"], d.get("threads"),
                   dict(d.get("runtime") or {}), [TableLayer.from_dict(e) for e in d["layers"]],
                   float(d["whole_dense_ms"]), float(d["rest_ms"]), list(d.get("validation") or []),
                   dict(d.get("device") or {}), dict(d.get("config") or {}), d.get("created", ""),
                   int(d.get("shapes_measured", 0)), int(d.get("shapes_cached", 0)), list(d.get("notes") or []))

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json(Path(path), self.as_dict())

    def markdown(self) -> list[str]:
        """The table for people: per layer, dense ms and each rank's ms (ratio to dense); then the validation."""
        return latency_table_markdown(self.as_dict())


def load_table(path: str | os.PathLike[str]) -> LatencyTable:
    """A latency table from its JSON file."""
    return LatencyTable.from_dict(read_schema_json(Path(path), TABLE_SCHEMA, SfedgeError, "re-measure it with `sfedge plan`"))


# -- kits -------------------------------------------------------------------------------------------------------


def is_kit(path: str | os.PathLike[str]) -> bool:
    """True for a latency kit folder (made by :func:`sfedge.latency_models.make_kit`)."""
    return (Path(path) / KIT_FILE).is_file()


def load_kit(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The kit's index (its files made absolute), checked: every file it names exists."""
    folder = Path(path)
    kit = read_schema_json(folder / KIT_FILE, KIT_SCHEMA, SfedgeError, "re-make the kit with `sfedge plan`")
    missing = [f for f in _kit_files(kit) if not (folder / f).is_file()]
    if missing:
        raise SfedgeError(f"latency kit {folder} is incomplete: {missing[0]} is missing",
                          "copy the whole kit folder, or re-make it with `sfedge plan`")
    kit["root"] = str(folder.resolve())
    return kit


def _kit_files(kit: Mapping[str, Any]) -> list[str]:
    files = [w["file"] for w in kit["whole"]]
    for entry in kit["shapes"].values():
        files.append(entry["dense"])
        files += list(entry["ranks"].values())
    return files


def cache_root() -> Path:
    """$SFEDGE_CACHE or ~/.cache/sfedge: where tables and measured shapes are kept."""
    return Path(os.environ.get("SFEDGE_CACHE") or Path.home() / ".cache" / "sfedge")


def shape_cache_dir(target: str, backend: str, runtime: Mapping[str, str], precision: str, threads: int | None,
                    root: Path | None = None) -> Path:
    """The folder of measured shapes for one target, runtime version, precision and thread count."""
    version = "-".join(f"{k}{v}" for k, v in sorted(runtime.items()) if k not in ("numpy", "execution_provider"))
    return (root or cache_root()) / "latency" / "shapes" / target / f"{backend}-{version}" / f"{precision}-t{threads or 0}"


def _subject(kit: Mapping[str, Any], rel: str, label: str) -> Subject:
    options = {"layout": kit["layout"]} if kit["backend"] == "tflite" else {}
    return Subject(Path(kit["root"]) / rel, kit["backend"], label, kit["precision"], label=label,
                   threads=kit.get("threads"), options=options)


def _runtime_versions(kit: Mapping[str, Any]) -> dict[str, str]:
    runner = runner_class(kit["backend"])(Path(kit["root"]) / kit["whole"][0]["file"])
    return {k: v for k, v in runner.versions().items()}


def measure_kit(
    path: str | os.PathLike[str],
    config: MeasureConfig | None = None,
    *,
    cache: bool = True,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    on_measurements: Callable[[list[Measurement], list[Pairing]], None] | None = None,
) -> LatencyTable:
    """Measure a kit into a :class:`LatencyTable` (see the module doc); shapes already cached are reused.

    ``on_measurements`` receives the whole-model run's measurements and
    pairings (the profile report of a kit shows those).
    """
    say = progress or (lambda message, fraction=None: None)
    config = config or TABLE_MEASURE
    kit = load_kit(path)
    runtime = _runtime_versions(kit)
    folder = shape_cache_dir(kit["target"], kit["backend"], runtime, kit["precision"], kit.get("threads"), cache_dir)
    shapes: dict[str, dict[str, Any]] = {}
    todo = []
    for key, entry in kit["shapes"].items():
        cached = _read_shape(folder / f"{key}.json") if cache else None
        wanted = {int(r) for r in entry["ranks"]}
        if cached is not None and wanted <= set(cached["ranks"]):
            shapes[key] = cached
        else:
            todo.append(key)
    for i, key in enumerate(todo):
        entry = kit["shapes"][key]
        ranks = sorted(int(r) for r in entry["ranks"])
        subjects = [_subject(kit, entry["dense"], f"{key} dense")] + [
            _subject(kit, entry["ranks"][str(r)], f"{key} r={r}") for r in ranks]
        part = _part(say, i / (len(todo) + 1) * 0.8, 0.8 / (len(todo) + 1), f"shape {i + 1}/{len(todo)} {key}")
        record: dict[str, Any] = {"key": key, "dense_ms": None, "dense_cv": None, "ranks": {},
                                  "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "device": host_info(), "runtime": runtime}
        if len(subjects) < 2:  # nothing to pair: the layer has no rank to choose (its dense time comes below)
            shapes[key] = record
            continue
        ms, pairings = measure_group(subjects, 0, config, part)
        by_label = {p.candidate: p for p in pairings}
        record["dense_ms"], record["dense_cv"] = ms[0].summary.median, ms[0].summary.cv
        for r, m in zip(ranks, ms[1:]):
            p = by_label[m.label].ratio
            record["ranks"][r] = {"ratio": p.ratio, "low": p.low, "high": p.high, "median_ms": m.summary.median}
        shapes[key] = record
        if cache:
            write_json(folder / f"{key}.json", record)

    say("measuring the whole models and every shape's dense conv together", 0.8)
    whole = kit["whole"]
    subjects = [_subject(kit, w["file"], f"whole {w['name']}") for w in whole]
    keys = list(kit["shapes"])
    subjects += [_subject(kit, kit["shapes"][k]["dense"], f"{k} dense") for k in keys]
    ms, pairings = measure_group(subjects, 0, config, _part(say, 0.8, 0.2, "whole models"))
    if on_measurements is not None:
        on_measurements(ms[: len(whole)], [p for p in pairings if p.candidate.startswith("whole ")])
    dense_iso = {k: m.summary.median for k, m in zip(keys, ms[len(whole):])}
    whole_dense = ms[0].summary.median
    layers = []
    for entry in kit["layers"]:
        key = ConvShape.from_dict(entry["shape"]).key()
        rec = shapes[key]
        d = dense_iso[key]
        ranks = {int(r): RankTime(d * v["ratio"], v["ratio"], v["low"], v["high"])
                 for r, v in rec["ranks"].items() if int(r) in {int(x) for x in entry["ranks"]}}
        layers.append(TableLayer(entry["name"], ConvShape.from_dict(entry["shape"]), d, ranks))
    rest = whole_dense - sum(e.dense_ms for e in layers)
    table = LatencyTable(kit["model"], kit["model_key"], kit["target"], kit["backend"], kit["precision"],
                         kit.get("threads"), runtime, layers, whole_dense, rest, device=host_info(),
                         config=config.as_dict(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         shapes_measured=len(todo), shapes_cached=len(kit["shapes"]) - len(todo))
    by_label = {p.candidate: p for p in pairings}
    for w, m in zip(whole, ms[: len(whole)]):
        ranks = {k: int(v) for k, v in (w.get("ranks") or {}).items()}
        predicted = table.predict(ranks)
        ratio = by_label[m.label].ratio.ratio if m.label in by_label else 1.0
        measured = whole_dense * ratio  # paired with the dense model in the same run
        table.validation.append({"name": w["name"], "ranks": ranks, "predicted_ms": predicted, "measured_ms": measured,
                                 "measured_median_ms": m.summary.median, "measured_ratio": ratio,
                                 "predicted_ratio": predicted / whole_dense, "error": predicted / measured - 1})
    if rest < 0:
        table.notes.append(f"the layers' isolated dense times add up to more than the whole model "
                           f"({-rest:.3f} ms more): per-model overhead dominates at this size; predictions of "
                           "differences still hold")
    return table


def _read_shape(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
        rec["ranks"] = {int(r): v for r, v in rec["ranks"].items()}
        return rec
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _part(say: Progress, start: float, span: float, what: str) -> Progress:
    return lambda message, fraction=None: say(f"{what}: {message}", None if fraction is None else start + span * fraction)


def write_kit_index(folder: Path, kit: Mapping[str, Any]) -> Path:
    """Write ``kit.json`` (what :func:`sfedge.latency_models.make_kit` calls once every file is in place)."""
    with atomic_path(folder / KIT_FILE) as tmp:
        tmp.write_text(json.dumps({**kit, "schema": KIT_SCHEMA}, indent=2))
    return folder / KIT_FILE


def kit_subjects(path: str | os.PathLike[str]) -> list[Subject]:
    """Every configuration in a kit (what the remote profiler needs to know which runtimes to install)."""
    kit = load_kit(path)
    return [_subject(kit, w["file"], f"whole {w['name']}") for w in kit["whole"]]


def predicted_vs(table: LatencyTable, named: Sequence[tuple[str, Mapping[str, int | None], float]]) -> list[dict[str, Any]]:
    """Rows of (name, predicted ms, measured ms, error) for models measured elsewhere (a plan's profile run)."""
    return [{"name": n, "predicted_ms": table.predict(r), "measured_ms": m, "error": table.predict(r) / m - 1}
            for n, r, m in named]
