"""Measurement orchestration: one worker process per configuration, single or paired.

Modelled on trtexec and TFLite's benchmark_model: load time and the first
inference are reported apart from the steady state; a warm-up (at least
``warmup_runs`` and ``warmup_seconds``) precedes at least ``runs`` timed
inferences lasting at least ``min_seconds``.

*Paired* mode is what makes an SFConv-vs-vanilla number trustworthy on a
shared or hot device: both configurations are loaded in their own workers, and
the parent alternates blocks of inferences between them in the counterbalanced
order A B B A A B ..., so slow drift (thermal throttling, another job) lands on
both alike.  Blocks last about 50 ms (re-sized every round from the times seen
so far) and a paired run has at least 20 rounds; the ratio of medians gets a
bootstrap CI that resamples whole rounds (see :mod:`sfedge.profile.stats`).
:func:`measure_group` does the same for more than two configurations (the
rank sweep), reversing the rotation every round.

Each configuration runs in ``processes`` workers (3 by default), rotated
A1 B1 A2 B2 A3 B3: two processes running the same artifact can differ by a
few percent (where their memory landed, which core, code layout), a
difference no within-process statistic sees; the CI resamples processes too.
Only the worker being timed may run: the others are suspended between their
blocks (an idle ONNX Runtime keeps its thread pool spinning), and each block
starts with one untimed inference, so every sample is a warm, back-to-back
inference like those of a long-running application.

Needs numpy and psutil only; the runtimes are imported in the workers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import sfedge
from sfedge import errors
from sfedge.errors import BundleError, ConfigError, SfedgeError
from sfedge.profile.memory import memory_notes
from sfedge.profile.stats import RatioCI, Summary, ratio_of_medians, summarize

__all__ = [
    "MeasureConfig", "Subject", "Measurement", "Pairing", "WorkerProcess", "measure", "measure_pair", "measure_group",
    "subjects_from", "pair_up", "profile_subjects",
]

Progress = Callable[[str, "float | None"], None]
ROUND_SECONDS = 0.05  # paired mode: aim for blocks of about this long, so rounds are many and close in time
MIN_ROUNDS = 20  # ... but never fewer rounds than this for the runs asked (the bootstrap resamples rounds)


@dataclass
class MeasureConfig:
    """How long and how often to measure (defaults follow trtexec / benchmark_model practice)."""

    warmup_runs: int = 1
    warmup_seconds: float = 0.5
    runs: int = 50
    min_seconds: float = 1.0
    threads: int | None = None  # overrides each artifact's target threads
    block: int | None = None  # inferences per round in paired mode (None: about ROUND_SECONDS)
    processes: int = 3  # worker processes per configuration (their differences enter the CI)
    confidence: float = 0.95
    resamples: int = 2000
    sample_interval: float = 0.1  # RSS sampler period (s); the kernel high-water mark catches what it misses
    seed: int = 0

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        import numpy as np

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


# -- the worker process ------------------------------------------------------------
class WorkerProcess:
    """A ``python -m sfedge.profile.worker`` subprocess and its request/reply channel.

    Between requests the process is suspended (SIGSTOP, or the platform's
    equivalent through psutil) unless ``freeze=False``, so only the worker
    being timed can use the CPU.
    """

    def __init__(self, subject: Subject, python: str = sys.executable, env: dict[str, str] | None = None,
                 freeze: bool = True) -> None:
        self.subject = subject
        package_root = Path(sfedge.__file__).resolve().parent.parent
        environment = dict(os.environ if env is None else env)
        if package_root.name not in ("site-packages", "dist-packages"):  # a source checkout: let the worker find it
            environment["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(package_root), environment.get("PYTHONPATH")) if p)
        environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [python, "-m", "sfedge.profile.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, bufsize=1, env=environment,
        )
        import psutil

        self._ps = psutil.Process(self.proc.pid)
        self.freeze = freeze
        self._frozen = False

    def request(self, cmd: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its reply (SfedgeError naming the configuration on failure).

        The worker is frozen again as soon as it has answered: an idle runtime
        must not compete with the one being timed (ONNX Runtime's thread pool
        keeps spinning after a run; on 2 cores three idle workers' spinning
        made the measured one 40% slower).
        """
        self._resume()
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **params}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=10)
            raise SfedgeError(
                f"the profiling worker for {self.subject.label} exited (code {self.proc.returncode}) during '{cmd}': "
                f"{self.stderr_tail() or 'no output'}",
                "run with --verbose; a crash while loading usually means the runtime does not support this artifact",
            )
        reply = json.loads(line)
        if self.freeze:
            self._suspend()
        if not reply.pop("ok", False):
            raise _worker_error(reply, self.subject.label, cmd)
        return reply

    def _suspend(self) -> None:
        try:
            self._ps.suspend()
            self._frozen = True
        except Exception:  # psutil.Error (gone, no permission): timing continues unfrozen, as before
            self.freeze = False

    def _resume(self) -> None:
        if self._frozen:
            try:
                self._ps.resume()
            except Exception:  # the process is gone: the request below reports it
                pass
            self._frozen = False

    def stderr_tail(self, lines: int = 1) -> str:
        self._stderr.seek(0)
        text = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
        return " | ".join(text[-lines:])

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        self._resume()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self._stderr.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_error(reply: dict[str, Any], label: str, cmd: str) -> SfedgeError:
    """Re-raise a worker's exception as the same sfedge error class, naming the configuration."""
    cls = getattr(errors, str(reply.get("type")), None)
    message = f"{label}: {reply.get('error')}"
    if isinstance(cls, type) and issubclass(cls, SfedgeError) and cls is not errors.UnknownNameError:
        return cls(message)
    return SfedgeError(f"{label}: '{cmd}' failed: {reply.get('type')}: {reply.get('error')}",
                       "run with --verbose for the worker's traceback")


# -- measuring ---------------------------------------------------------------------
def measure(subject: Subject, config: MeasureConfig | None = None, progress: Progress | None = None) -> Measurement:
    """Measure one configuration in its own worker process."""
    return _run([subject], config or MeasureConfig(), progress)[0]


def measure_pair(
    candidate: Subject, baseline: Subject, config: MeasureConfig | None = None, progress: Progress | None = None,
) -> tuple[Measurement, Measurement, Pairing]:
    """Measure two configurations alternately (A B B A ...) and compare their medians with a bootstrap CI."""
    (a, b), [pairing] = measure_group([candidate, baseline], 1, config or MeasureConfig(), progress)
    return a, b, pairing


def measure_group(
    subjects: Sequence[Subject], baseline: int, config: MeasureConfig | None = None, progress: Progress | None = None,
) -> tuple[list[Measurement], list[Pairing]]:
    """Measure several configurations in rotation (A B C C B A ...), each compared with ``subjects[baseline]``.

    One round runs a block on every worker; all configurations therefore see
    the same drift, and every ratio to the baseline is paired (used by the
    rank sweep, where each s is compared with the vanilla model).
    """
    if len(subjects) < 2:
        raise ConfigError("a paired comparison needs at least two configurations", "give --pair BUNDLE")
    config = config or MeasureConfig()
    measurements = _run(subjects, config, progress)
    base = measurements[baseline]
    pairings = []
    for i, m in enumerate(measurements):
        if i == baseline:
            continue
        ci = ratio_of_medians(m.samples_ms, base.samples_ms, candidate_rounds=m.rounds, baseline_rounds=base.rounds,
                              candidate_processes=m.process, baseline_processes=base.process,
                              confidence=config.confidence, resamples=config.resamples, seed=config.seed)
        n_rounds = len(set(m.rounds))
        order = "ABBA" if len(subjects) == 2 else "rotating, reversed every round"
        pairings.append(Pairing(m.label, base.label, ci, round(len(m.samples_ms) / max(1, n_rounds)), n_rounds, order))
    return measurements, pairings


def _run(subjects: Sequence[Subject], config: MeasureConfig, progress: Progress | None) -> list[Measurement]:
    """Load ``config.processes`` workers per subject, warm each up, then rotate blocks over all of them.

    A round runs one block on every worker in the order A1 B1 A2 B2 ...,
    reversed on odd rounds, so drift is shared and each configuration's
    processes are spread over the round.
    """
    say = progress or (lambda message, fraction=None: None)
    slots = [(i, k) for k in range(config.processes) for i in range(len(subjects))]  # (subject, process), interleaved
    workers = [WorkerProcess(subjects[i]) for i, _ in slots]
    n = len(workers)
    try:
        loaded, warm = [], []
        for w, (_, k) in zip(workers, slots):
            say(f"loading {w.subject.label} (process {k + 1}/{config.processes})", 0.0)
            threads = config.threads or w.subject.threads
            loaded.append(w.request("load", path=str(w.subject.path), backend=w.subject.backend, threads=threads,
                                    options=w.subject.options, input=str(w.subject.input) if w.subject.input else None,
                                    runner=w.subject.runner, sample_interval=config.sample_interval))
        for w in workers:
            say(f"warming up {w.subject.label}", 0.0)
            reply = w.request("warmup", runs=config.warmup_runs, seconds=config.warmup_seconds)
            warm.append([ns / 1e6 for ns in reply["samples_ns"]])
        samples: list[list[float]] = [[] for _ in workers]
        rounds: list[list[int]] = [[] for _ in workers]
        starts: list[list[int]] = [[] for _ in workers]

        def pooled(i: int) -> list[float]:
            return [v for (j, _), s in zip(slots, samples) if j == i for v in s]

        r = 0
        while not (all(len(p) >= config.runs and sum(p) / 1e3 >= config.min_seconds
                       for p in map(pooled, range(len(subjects)))) and (n == 1 or r >= MIN_ROUNDS)):
            # Re-sized every round from what the run has seen so far (warm-up times can mislead).
            seen = samples if samples[0] else warm
            block = config.block or _block_size(max(_median(ms) for ms in seen) / 1e3, config, n > 1)
            for j in (range(n) if r % 2 == 0 else reversed(range(n))):
                reply = workers[j].request("run", count=block, rewarm=1 if n > 1 else 0)
                samples[j].extend(ns / 1e6 for ns in reply["samples_ns"])
                rounds[j].extend([r] * len(reply["samples_ns"]))
                starts[j].extend(reply["starts_ns"])
            r += 1
            done = min(min(len(p) / config.runs, (sum(p) / 1e3 / config.min_seconds) if config.min_seconds else 1.0)
                       for p in map(pooled, range(len(subjects))))
            if n > 1:
                done = min(done, r / MIN_ROUNDS)
            say(f"measuring {' vs '.join(s.label for s in subjects)}", min(1.0, done))
        memory = [w.request("memory") for w in workers]
    finally:
        for w in workers:
            w.close()
    origin = min(st[0] for st in starts)
    out = []
    for i, subject in enumerate(subjects):
        mine = [j for j, (si, _) in enumerate(slots) if si == i]
        out.append(_measurement(subject, config, [loaded[j] for j in mine], [warm[j] for j in mine],
                                [samples[j] for j in mine], [rounds[j] for j in mine],
                                [[(t - origin) / 1e9 for t in starts[j]] for j in mine], [memory[j] for j in mine]))
    return out


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _block_size(seconds_per_run: float, config: MeasureConfig, rotating: bool) -> int:
    """Inferences per block: about ROUND_SECONDS when rotating over workers (0.2 s chunks for one), >= MIN_ROUNDS rounds.

    Rounds must be short, so drift is shared between A and B, and many,
    because the bootstrap resamples rounds; but not single inferences for
    fast models, where switching processes (cold caches, IPC) would weigh.
    """
    per_run = max(seconds_per_run, 1e-6)
    if not rotating:
        return max(1, round(0.2 / per_run))
    expected = max(config.runs, math.ceil(config.min_seconds / per_run)) / config.processes  # per process
    return max(1, min(round(ROUND_SECONDS / per_run), int(expected // MIN_ROUNDS)))


def _measurement(subject: Subject, config: MeasureConfig, loaded: list[dict], warm: list[list[float]],
                 samples: list[list[float]], rounds: list[list[int]], starts: list[list[float]],
                 memory: list[dict]) -> Measurement:
    """One configuration's processes merged: samples pooled in time order; load and memory of the first process.

    The first process loads from a cold page cache, as a device would after
    boot; the others' figures are kept in ``per_process``.
    """
    rows = sorted((t, v, r, k) for k, (ts, vs, rs) in enumerate(zip(starts, samples, rounds))
                  for t, v, r in zip(ts, vs, rs))
    first = loaded[0]
    runtime = memory[0].get("runtime", {})
    mem = {key: first[key] for key in ("rss_start", "rss_before_load", "rss_after_load", "rss_after_first")}
    mem.update({key: v for key, v in memory[0].items() if key != "runtime"})
    mem["runtime"] = runtime
    per_process = [
        {"pid": ld.get("pid"), "load_ms": ld["load_ms"], "first_ms": ld["first_ms"],
         "median_ms": _median(vs) if vs else None, "n": len(vs), "peak_rss_steady": mm.get("peak_rss_steady")}
        for ld, vs, mm in zip(loaded, samples, memory)
    ]
    m = Measurement(
        label=subject.label, model=subject.model, backend=subject.backend, precision=subject.precision,
        artifact=str(subject.path), artifact_bytes=subject.size_bytes, threads=config.threads or subject.threads,
        import_ms=first["import_ms"], load_ms=first["load_ms"], first_ms=first["first_ms"],
        warmup_ms=[v for w in warm for v in w], samples_ms=[v for _, v, _, _ in rows],
        rounds=[r for _, _, r, _ in rows], memory=mem, starts_s=[round(t, 7) for t, _, _, _ in rows],
        process=[k for _, _, _, k in rows], per_process=per_process, versions=first.get("versions", {}),
        inputs=first["inputs"], feed=first["feed"], meta=dict(subject.meta),
    )
    m.notes.extend(memory_notes(subject.backend, runtime))
    return m


# -- what to measure -----------------------------------------------------------------
def subjects_from(path: str | Path, backend: str | None = None) -> list[Subject]:
    """The configurations in a bundle (every runnable artifact, or the one for ``backend``) or a bare artifact file."""
    from sfedge.backends import backend_for_path
    from sfedge.bundle import is_bundle, load_bundle

    p = Path(path)
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
                           meta={**meta, "parity": a.parity}))
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


def profile_subjects(
    subjects: Sequence[Subject],
    pairs: Sequence[tuple[Subject, Subject]] = (),
    config: MeasureConfig | None = None,
    progress: Progress | None = None,
) -> tuple[list[Measurement], list[Pairing]]:
    """Measure ``subjects`` one by one and ``pairs`` alternately; labels are made unique."""
    config = config or MeasureConfig()
    pairs = [(replace(c), replace(b)) for c, b in pairs]  # a baseline shared by two pairs is measured twice
    subjects = [replace(s) for s in subjects]
    _unique_labels([*(s for p in pairs for s in p), *subjects])
    measurements: list[Measurement] = []
    pairings: list[Pairing] = []
    total = len(subjects) + len(pairs)

    def part(i: int) -> Progress | None:
        if progress is None:
            return None
        return lambda message, fraction=None: progress(f"[{i + 1}/{total}] {message}",
                                                       None if fraction is None else (i + fraction) / total)

    for i, (cand, base) in enumerate(pairs):
        a, b, pairing = measure_pair(cand, base, config, part(i))
        measurements += [a, b]
        pairings.append(pairing)
    for j, subject in enumerate(subjects):
        measurements.append(measure(subject, config, part(len(pairs) + j)))
    return measurements, pairings


def _unique_labels(subjects: Sequence[Subject]) -> None:
    seen: dict[str, int] = {}
    for s in subjects:
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label = f"{s.label} #{seen[s.label]}"
