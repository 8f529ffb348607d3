"""Latency statistics: the summary on known samples, and the paired bootstrap CI's coverage under drift."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from sfedge.profile.stats import CV_WARNING, pareto_front, ratio_of_medians, summarize


def test_summary_of_known_samples():
    x = list(range(1, 101))  # 1..100
    s = summarize(x)
    assert (s.n, s.min, s.max) == (100, 1.0, 100.0)
    assert s.mean == pytest.approx(50.5)
    assert s.median == pytest.approx(50.5)
    # numpy's default percentile: linear interpolation at rank q/100 * (n - 1)
    assert s.p90 == pytest.approx(1 + 0.90 * 99)
    assert s.p99 == pytest.approx(1 + 0.99 * 99)
    assert s.std == pytest.approx(statistics.stdev(x))
    assert s.cv == pytest.approx(statistics.stdev(x) / 50.5)
    assert s.noisy  # CV ~57%


def test_summary_of_a_constant_and_of_one_sample():
    s = summarize([2.0] * 10)
    assert s.std == 0 and s.cv == 0 and not s.noisy and s.p99 == 2.0
    one = summarize([3.5])
    assert one.n == 1 and one.std == 0 and one.median == 3.5
    with pytest.raises(ValueError):
        summarize([])


def test_cv_warning_threshold_is_five_percent():
    quiet = summarize(np.full(100, 10.0) + np.tile([-0.3, 0.3], 50))  # std ~0.3 -> CV 3%
    noisy = summarize(np.full(100, 10.0) + np.tile([-0.7, 0.7], 50))  # CV 7%
    assert CV_WARNING == 0.05 and not quiet.noisy and noisy.noisy


def test_ratio_of_medians_point_estimate_and_interval_order():
    rng = np.random.default_rng(1)
    a = 10 * rng.lognormal(0, 0.05, 400)
    b = 20 * rng.lognormal(0, 0.05, 400)
    ci = ratio_of_medians(a, b, confidence=0.95, resamples=1000, seed=3)
    assert ci.ratio == pytest.approx(np.median(a) / np.median(b))
    assert ci.low <= ci.ratio <= ci.high
    assert ci.speedup == pytest.approx(1 / ci.ratio)
    assert ci.speedup_low == pytest.approx(1 / ci.high) and ci.speedup_high == pytest.approx(1 / ci.low)
    assert not ci.paired and ci.contains(0.5)
    again = ratio_of_medians(a, b, confidence=0.95, resamples=1000, seed=3)
    assert (again.low, again.high) == (ci.low, ci.high)  # seeded: reports are reproducible
    wider = ratio_of_medians(a, b, confidence=0.99, resamples=1000, seed=3)
    assert wider.low <= ci.low and wider.high >= ci.high


def _paired_experiment(rng, true_ratio, rounds=40, block=5, drift=0.3):
    """Simulate A B B A ... rounds on a device whose speed drifts by `drift` over the run (throttling)."""
    a, b, ra, rb, t = [], [], [], [], 0.0
    for r in range(rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for side in order:
            for _ in range(block):
                speed = 1 + drift * t / (rounds * block * 2)  # slows down linearly
                noise = rng.lognormal(0, 0.08)
                if side == "a":
                    a.append(true_ratio * speed * noise)
                    ra.append(r)
                else:
                    b.append(speed * noise)
                    rb.append(r)
                t += 1
    return np.array(a), np.array(b), np.array(ra), np.array(rb)


def test_paired_bootstrap_covers_the_true_ratio_under_drift():
    """Over many simulated paired runs on a drifting device, the 95% CI holds the true ratio ~95% of the time."""
    rng = np.random.default_rng(7)
    hits, widths = 0, []
    trials = 200
    for i in range(trials):
        a, b, ra, rb = _paired_experiment(rng, 0.5)
        ci = ratio_of_medians(a, b, candidate_rounds=ra, baseline_rounds=rb, resamples=400, seed=i)
        assert ci.paired and ci.blocks == 40
        hits += ci.contains(0.5)
        widths.append(ci.high - ci.low)
    coverage = hits / trials
    assert 0.88 <= coverage <= 0.995, coverage
    assert np.median(widths) < 0.05  # informative, not vacuous


def test_sequential_runs_under_drift_are_biased_which_pairing_avoids():
    """Measuring all of A then all of B on a device that slows down by 30% puts the truth outside the CI."""
    rng = np.random.default_rng(11)
    n = 200
    t = np.arange(2 * n) / (2 * n)
    speed = 1 + 0.3 * t
    a = 0.5 * speed[:n] * rng.lognormal(0, 0.08, n)  # A first, on a cool device
    b = speed[n:] * rng.lognormal(0, 0.08, n)  # then B, throttled
    unpaired = ratio_of_medians(a, b, resamples=500)
    assert not unpaired.contains(0.5) and unpaired.ratio < 0.45
    a2, b2, ra, rb = _paired_experiment(rng, 0.5, rounds=40, block=5, drift=0.3)
    paired = ratio_of_medians(a2, b2, candidate_rounds=ra, baseline_rounds=rb, resamples=500)
    assert paired.contains(0.5)


def test_paired_bootstrap_with_uneven_rounds():
    rng = np.random.default_rng(2)
    a = rng.lognormal(0, 0.1, 31)
    b = 2 * rng.lognormal(0, 0.1, 29)
    ra = np.repeat(np.arange(10), 4)[:31]
    rb = np.repeat(np.arange(10), 3)[:29]
    ci = ratio_of_medians(a, b, candidate_rounds=ra, baseline_rounds=rb, resamples=300)
    assert ci.paired and ci.low <= ci.ratio <= ci.high


def test_pareto_front():
    pts = [
        {"name": "dense", "median_ms": 10.0, "q": 1.00},
        {"name": "s=0.5", "median_ms": 6.0, "q": 0.99},
        {"name": "s=0.25", "median_ms": 4.0, "q": 0.95},
        {"name": "worse", "median_ms": 7.0, "q": 0.90},  # slower and worse than s=0.5
        {"name": "s=0.125", "median_ms": 3.5, "q": 0.80},
    ]
    front = [p["name"] for p in pareto_front(pts, "q")]
    assert front == ["s=0.125", "s=0.25", "s=0.5", "dense"]


def _experiment_with_process_effects(rng, processes, rounds=30, block=4, process_sd=0.03, noise=0.08):
    """A/A: every worker process has its own speed (lognormal, sd 3%), as seen on real machines."""
    speed_a = rng.lognormal(0, process_sd, processes)
    speed_b = rng.lognormal(0, process_sd, processes)
    a, b, ra, rb, pa, pb = [], [], [], [], [], []
    for r in range(rounds):
        for p in range(processes):
            a += list(speed_a[p] * rng.lognormal(0, noise, block))
            b += list(speed_b[p] * rng.lognormal(0, noise, block))
            ra += [r] * block
            rb += [r] * block
            pa += [p] * block
            pb += [p] * block
    return (np.array(v) for v in (a, b, ra, rb, pa, pb))


def test_resampling_processes_keeps_coverage_when_processes_differ():
    """Ignoring process-to-process differences gives CIs that miss the truth most of the time; resampling
    processes (P-1 of P) brings three processes per side close to the nominal 95%."""
    rng = np.random.default_rng(3)
    trials, with_p, without_p = 150, 0, 0
    for i in range(trials):
        a, b, ra, rb, pa, pb = _experiment_with_process_effects(rng, 3)
        without_p += ratio_of_medians(a, b, candidate_rounds=ra, baseline_rounds=rb, resamples=300, seed=i).contains(1)
        with_p += ratio_of_medians(a, b, candidate_rounds=ra, baseline_rounds=rb, candidate_processes=pa,
                                   baseline_processes=pb, resamples=300, seed=i).contains(1)
    assert without_p / trials < 0.7
    assert with_p / trials >= 0.85
