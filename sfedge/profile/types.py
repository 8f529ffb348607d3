"""The profiler's data: what to measure (:class:`Subject`), how (:class:`MeasureConfig`), and the results.

Numpy and the standard library only: these travel between the scheduler, the
report, the remote profiler and ``compare``, on the device and the
workstation alike.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.errors import ConfigError
from sfedge.profile.stats import RatioCI, Summary, summarize

__all__ = ["MeasureConfig", "Subject", "Measurement", "Pairing"]


def _option(help_text: str) -> Any:
    """Field metadata: the field's command-line help (its flag is the field name with dashes)."""
    return {"help": help_text}


@dataclass
class MeasureConfig:
    """How long and how often to measure (defaults follow trtexec / benchmark_model practice).

    Every field is also a command-line option (``--warmup-runs`` ...): the
    CLI's options, the config and the flags the remote profiler passes on are
    all made from these fields (:meth:`add_arguments`, :meth:`from_args`,
    :meth:`to_argv`), so none of them can drop a setting.
    """

    warmup_runs: int = field(default=1, metadata=_option("at least this many warm-up runs"))
    warmup_seconds: float = field(default=0.5, metadata=_option("and at least this long (s)"))
    runs: int = field(default=50, metadata=_option("at least this many timed runs"))
    min_seconds: float = field(default=1.0, metadata=_option("and at least this long (s)"))
    threads: int | None = field(default=None, metadata=_option("runtime threads (default: the bundle's target threads)"))
    block: int | None = field(default=None, metadata=_option("runs per alternation round in paired mode "
                                                             "(default: about 50 ms)"))
    processes: int = field(default=3, metadata=_option("worker processes per configuration; their differences enter "
                                                       "the CI (1 on memory-tight devices)"))
    confidence: float = field(default=0.95, metadata=_option("confidence of the paired ratio's CI"))
    resamples: int = field(default=2000, metadata=_option("bootstrap resamples of the paired ratio's CI"))
    sample_interval: float = field(default=0.1, metadata=_option("RSS sampler period (s); the kernel high-water "
                                                                 "mark catches what it misses"))
    seed: int = field(default=0, metadata=_option("seed of the bootstrap and of random feeds"))

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup_runs < 1:
            raise ConfigError("--runs and --warmup-runs must be at least 1", "e.g. --runs 50 --warmup-runs 1")
        if self.min_seconds < 0 or self.warmup_seconds < 0:
            raise ConfigError("--min-seconds and --warmup-seconds cannot be negative", "e.g. --min-seconds 1")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence {self.confidence} is not in (0, 1)", "e.g. --confidence 0.95")
        if self.block is not None and self.block < 1:
            raise ConfigError("--block must be at least 1", "or leave it out to size blocks automatically")
        if self.processes < 1:
            raise ConfigError("--processes must be at least 1", "e.g. --processes 3 (1 on memory-tight devices)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1", "e.g. --threads 2")
        if self.resamples < 100 or self.sample_interval <= 0:
            raise ConfigError("--resamples must be at least 100 and --sample-interval positive",
                              "e.g. --resamples 2000 --sample-interval 0.1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The measurement options, one per field, in a group of their own."""
        group = parser.add_argument_group("measurement (trtexec / benchmark_model practice)")
        hints = typing.get_type_hints(MeasureConfig)
        for f in fields(MeasureConfig):
            kind = int if "int" in str(hints[f.name]) else float
            default = "" if f.default is None else f" (default {f.default})"
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                               help=f.metadata["help"] + default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MeasureConfig:
        """The config the options of :meth:`add_arguments` describe."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def to_argv(self) -> list[str]:
        """The same config as command-line flags (what the remote profiler runs on the device)."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                argv += ["--" + f.name.replace("_", "-"), str(value)]
        return argv


@dataclass
class Subject:
    """One configuration to measure: an artifact file and what it is."""

    path: Path
    backend: str
    model: str
    precision: str
    label: str = ""
    threads: int | None = None
    input: Path | None = None  # .npy of float32 NCHW inputs (the bundle's held-out split); None: random feed
    runner: str | None = None  # "module:Class" of a custom Runner instead of the backend registry
    options: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0  # the artifact file and its companions (external weights)
    meta: dict[str, Any] = field(default_factory=dict)  # bundle, target, family, conv, s, pair_key

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.label:
            self.label = f"{self.model} {self.backend} {self.precision}"
        if not self.size_bytes and self.path.is_file():
            self.size_bytes = self.path.stat().st_size + sum(
                f.stat().st_size for f in self.path.parent.glob(self.path.name + ".data") if f.is_file())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["input"] = str(self.path), str(self.input) if self.input else None
        return d


@dataclass
class Measurement:
    """Everything measured for one configuration; every raw sample is kept (milliseconds)."""

    label: str
    model: str
    backend: str
    precision: str
    artifact: str
    artifact_bytes: int
    threads: int | None
    import_ms: float
    load_ms: float
    first_ms: float
    warmup_ms: list[float]
    samples_ms: list[float]
    rounds: list[int]  # the round each sample belongs to (paired runs alternate rounds)
    memory: dict[str, Any]
    starts_s: list[float] = field(default_factory=list)  # when each timed inference started, s after the first one
    process: list[int] = field(default_factory=list)  # which of the configuration's worker processes took each sample
    per_process: list[dict[str, Any]] = field(default_factory=list)  # pid, load, first run, median, peak RSS
    versions: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    feed: str = ""
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> Summary:
        return summarize(self.samples_ms)

    @property
    def drift(self) -> float:
        """Median of the last third of the samples over the first third (1.0: no drift during the run)."""
        n = len(self.samples_ms) // 3
        if n < 3:
            return 1.0
        return float(np.median(self.samples_ms[-n:]) / np.median(self.samples_ms[:n]))

    @property
    def process_spread(self) -> float:
        """(max - min) / median of the per-process medians: how much a fresh process changes the number."""
        medians = [p["median_ms"] for p in self.per_process]
        if len(medians) < 2:
            return 0.0
        return (max(medians) - min(medians)) / self.summary.median

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary.as_dict()
        d["drift"] = self.drift
        d["process_spread"] = self.process_spread
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Pairing:
    """A paired comparison: candidate (SFConv) against baseline (vanilla), run alternately."""

    candidate: str  # Measurement labels
    baseline: str
    ratio: RatioCI
    block: int
    rounds: int
    order: str = "ABBA"

    def as_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "baseline": self.baseline, "ratio": self.ratio.as_dict(),
                "block": self.block, "rounds": self.rounds, "order": self.order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pairing:
        return cls(d["candidate"], d["baseline"], RatioCI.from_dict(d["ratio"]), d["block"], d["rounds"], d.get("order", "ABBA"))
