"""Latency statistics: the summary trtexec and benchmark_model print, and a paired ratio with a bootstrap CI.

Numpy only (runs on devices).  Percentiles use numpy's default (linear
interpolation between order statistics), so the numbers match what a user gets
from ``numpy.percentile`` on the raw samples kept in the report.

The SFConv-vs-vanilla ratio is a ratio of medians.  Its confidence interval
comes from a bootstrap that resamples whole *rounds* of the paired run (one
round = a block of A runs and the block of B runs next to it), so the
resampling keeps what the alternation bought: runs close in time stay together,
and slow drift (thermal throttling, a neighbour's job) moves A and B alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Summary", "RatioCI", "summarize", "ratio_of_medians", "pareto_front", "CV_WARNING"]

CV_WARNING = 0.05  # trtexec / benchmark_model practice: above 5% the machine is too noisy to trust one number


@dataclass
class Summary:
    """Order statistics and spread of one set of latencies (milliseconds)."""

    n: int
    min: float
    mean: float
    median: float
    p90: float
    p99: float
    max: float
    std: float
    cv: float  # std / mean

    @property
    def noisy(self) -> bool:
        """True when the coefficient of variation says the numbers are not stable."""
        return self.cv > CV_WARNING

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples: Any) -> Summary:
    """Summary of ``samples`` (any unit; sfedge passes milliseconds); sample std (ddof=1)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no samples to summarize")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(x, [50, 90, 99]))
    return Summary(
        n=int(x.size), min=float(x.min()), mean=mean, median=p50, p90=p90, p99=p99, max=float(x.max()),
        std=std, cv=std / mean if mean > 0 else math.inf,
    )


@dataclass
class RatioCI:
    """median(candidate) / median(baseline) with a bootstrap confidence interval.

    ``ratio`` < 1 means the candidate is faster; ``speedup`` is its inverse
    (baseline / candidate), the number people quote ("SFConv is 2.1x faster").
    """

    ratio: float
    low: float
    high: float
    confidence: float
    resamples: int
    blocks: int  # how many units were resampled (rounds when paired, samples otherwise)
    paired: bool

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio

    @property
    def speedup_low(self) -> float:
        return 1.0 / self.high

    @property
    def speedup_high(self) -> float:
        return 1.0 / self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(speedup=self.speedup, speedup_low=self.speedup_low, speedup_high=self.speedup_high)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RatioCI:
        return cls(**{k: d[k] for k in ("ratio", "low", "high", "confidence", "resamples", "blocks", "paired")})


def ratio_of_medians(
    candidate: Any,
    baseline: Any,
    *,
    candidate_rounds: Any = None,
    baseline_rounds: Any = None,
    candidate_processes: Any = None,
    baseline_processes: Any = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> RatioCI:
    """Ratio of medians candidate/baseline and its percentile-bootstrap confidence interval.

    With ``*_rounds`` (the round index of every sample from a paired run) the
    bootstrap draws rounds with replacement and takes every A and B sample of
    each drawn round, which keeps the pairing.  With ``*_processes`` too (which
    worker process of its configuration took each sample) it also draws each
    side's processes with replacement: two processes running the same
    artifact differ by a few percent (memory placement, core, layout), and a
    CI that ignored this would claim differences no rerun reproduces.
    Without rounds it resamples A and B independently (two unpaired runs).
    """
    a = np.asarray(candidate, dtype=np.float64).ravel()
    b = np.asarray(baseline, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("both sides need samples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    rng = np.random.default_rng(seed)
    ratio = float(np.median(a) / np.median(b))
    paired = candidate_rounds is not None and baseline_rounds is not None
    if paired:
        ra, rb = _ids(candidate_rounds, a), _ids(baseline_rounds, b)
        rounds = np.intersect1d(ra, rb)
        paired = rounds.size >= 2
    if paired:
        keep_a, keep_b = np.isin(ra, rounds), np.isin(rb, rounds)  # a round only one side finished cannot be drawn
        round_counts = _draws(rng, rounds.size, resamples)
        groups_a = [(np.searchsorted(rounds, ra[keep_a]), round_counts)]
        groups_b = [(np.searchsorted(rounds, rb[keep_b]), round_counts)]
        for ids, keep, groups in ((candidate_processes, keep_a, groups_a), (baseline_processes, keep_b, groups_b)):
            if ids is not None:
                procs = _ids(ids, a if groups is groups_a else b)[keep]
                values, index = np.unique(procs, return_inverse=True)
                if values.size > 1:  # P-1 draws out of P: an unbiased variance for few processes (see _draws)
                    groups.append((index, _draws(rng, values.size, resamples, values.size - 1)))
        boot = _bootstrap_medians(a[keep_a], groups_a) / _bootstrap_medians(b[keep_b], groups_b)
        blocks = int(rounds.size)
    else:
        ma = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
        mb = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)
        boot = ma / mb
        blocks = int(min(a.size, b.size))
    tail = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(boot, [tail, 1 - tail]))
    return RatioCI(ratio, min(low, ratio), max(high, ratio), confidence, resamples, blocks, paired)


def _ids(ids: Any, samples: np.ndarray) -> np.ndarray:
    out = np.asarray(ids).ravel()
    if out.size != samples.size:
        raise ValueError("one round (and process) index per sample is needed")
    return out


def _draws(rng: np.random.Generator, n: int, resamples: int, m: int | None = None) -> np.ndarray:
    """How often each of ``n`` units is drawn when ``m`` (default ``n``) are drawn per resample (``resamples`` x ``n``).

    Drawing n of n understates the spread between few units by (n-1)/n (a
    factor 2 for two processes); drawing n-1 of n makes the bootstrap variance
    of their mean effect unbiased, which matters for 2-3 processes.
    """
    return rng.multinomial(n if m is None else m, np.full(n, 1.0 / n), size=resamples)


def _bootstrap_medians(x: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Medians of every bootstrap resample without building it: each sample weighs the product of its units' draws.

    ``groups``: (unit index of every sample, draws per resample and unit),
    e.g. rounds and processes.  Sort the samples once; with the weights, the
    median's middle elements are where the cumulative weight passes (T-1)//2
    and T//2 (numpy averages the two for an even total).  An all-zero resample
    (possible when units are crossed) falls back to the plain median.
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    cols = [(index[order], draws) for index, draws in groups]
    n = groups[0][1].shape[0]
    out = np.empty(n)
    chunk = max(1, 4_000_000 // max(1, xs.size))  # bound memory on small devices
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        w = np.ones((stop - start, xs.size), dtype=np.int64)
        for col, draws in cols:
            w *= draws[start:stop][:, col]
        cum = np.cumsum(w, axis=1)
        total = cum[:, -1]
        empty = total == 0
        total = np.where(empty, 1, total)
        lo = np.argmax(cum > ((total - 1) // 2)[:, None], axis=1)
        hi = np.argmax(cum > (total // 2)[:, None], axis=1)
        med = (xs[lo] + xs[hi]) / 2
        med[empty] = np.median(xs)
        out[start:stop] = med
    return out


def pareto_front(points: Sequence[dict[str, Any]], quality: str, latency: str = "median_ms") -> list[dict[str, Any]]:
    """Points no other point beats on both axes (lower latency and higher quality)."""
    front = []
    for p in points:
        dominated = any(
            q is not p and q[latency] <= p[latency] and q[quality] >= p[quality]
            and (q[latency] < p[latency] or q[quality] > p[quality])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p[latency])
