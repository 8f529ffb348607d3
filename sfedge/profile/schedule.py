"""Scheduling measurements: one worker process per configuration, single, paired or rotating.

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

import math
import os
from collections.abc import Sequence
from dataclasses import replace

from sfedge.errors import ConfigError
from sfedge.profile.client import WorkerProcess
from sfedge.profile.memory import memory_notes
from sfedge.profile.stats import ratio_of_medians
from sfedge.profile.types import MeasureConfig, Measurement, Pairing, Subject
from sfedge.progress import Progress

__all__ = ["measure", "measure_pair", "measure_group", "profile_subjects", "ROUND_SECONDS", "MIN_ROUNDS"]

ROUND_SECONDS = 0.05  # paired mode: aim for blocks of about this long, so rounds are many and close in time
MIN_ROUNDS = 20  # ... but never fewer rounds than this for the runs asked (the bootstrap resamples rounds)


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
            # Absolute paths: the worker runs in a neutral working folder (sfedge.isolation).
            loaded.append(w.request("load", path=os.path.abspath(w.subject.path), backend=w.subject.backend,
                                    threads=threads, options=w.subject.options,
                                    input=os.path.abspath(w.subject.input) if w.subject.input else None,
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
