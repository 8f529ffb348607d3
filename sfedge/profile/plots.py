"""PNG plots for profile, compare and sweep reports (matplotlib, Agg backend, imported lazily).

A device with only the runtime-only install has no matplotlib: every entry
point here then returns a one-line note instead of failing, and the report
keeps its JSON, CSV and Markdown.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.errors import install_hint
from sfedge.profile.emulation import EMULATED_LABEL
from sfedge.profile.stats import pareto_front
from sfedge.profile.types import Measurement

__all__ = ["write_report_plots", "plot_compare", "plot_sweep", "plot_layers", "MISSING_NOTE"]

MISSING_NOTE = f"matplotlib is not installed here, so no plots were drawn ({install_hint('plots')})"
MIB = 1024 * 1024


_LOCK = threading.Lock()  # pyplot is not thread-safe; remote profiling writes several hosts' reports at once


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _serialised(draw: Callable[..., str | None]) -> Callable[..., str | None]:
    @functools.wraps(draw)
    def locked(*args: Any, **kwargs: Any) -> str | None:
        with _LOCK:
            return draw(*args, **kwargs)

    return locked


@_serialised
def write_report_plots(device: str, measurements: Sequence[Measurement], pairs: Sequence[dict[str, Any]],
                       folder: Path, caption: str = "") -> str | None:
    """latency.png, speedup.png (when paired) and memory.png into ``folder``; a note if matplotlib is missing.

    ``pairs`` are the report's pair rows (:func:`sfedge.profile.tables.pair_rows`); ``caption`` is appended to
    the latency titles (e.g. that they were measured under emulation).
    """
    try:
        plt = _pyplot()
    except ImportError:
        return MISSING_NOTE
    _latency(plt, device, measurements, folder / "latency.png", caption)
    if pairs:
        _speedup(plt, device, pairs, folder / "speedup.png", caption)
    _memory(plt, device, measurements, folder / "memory.png")
    return None


def _latency(plt: Any, device: str, measurements: Sequence[Measurement], path: Path, caption: str = "") -> None:
    """Latency distribution per configuration, one panel per precision (box + every sample as a dot)."""
    groups: dict[str, list[Any]] = {}
    for m in measurements:
        groups.setdefault(m.precision, []).append(m)
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(8, 1.2 + sum(0.55 * len(v) + 0.6 for v in groups.values())),
                             height_ratios=[len(v) + 1 for v in groups.values()])
    for ax, (precision, ms) in zip(axes[:, 0], groups.items()):
        data = [m.samples_ms for m in ms]
        ax.boxplot(data, orientation="horizontal", showfliers=False, widths=0.6)
        rng = np.random.default_rng(0)
        for i, d in enumerate(data, start=1):
            ax.scatter(d, i + rng.uniform(-0.18, 0.18, len(d)), s=3, alpha=0.25, color="tab:blue", linewidths=0)
        ax.set_yticks(range(1, len(ms) + 1), [m.label for m in ms], fontsize=8)
        ax.set_title(f"{precision}", fontsize=9, loc="left")
        lo = min(min(d) for d in data)
        hi = max(max(d) for d in data)
        if hi / max(lo, 1e-9) > 20:
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("latency per inference (ms)")
    fig.suptitle(f"{device}: latency distribution{caption}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _speedup(plt: Any, device: str, rows: Sequence[dict[str, Any]], path: Path, caption: str = "") -> None:
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(rows)))
    y = list(range(len(rows)))
    vals = [r["speedup"] for r in rows]
    err = [[r["speedup"] - r["speedup_low"] for r in rows], [r["speedup_high"] - r["speedup"] for r in rows]]
    ax.barh(y, vals, xerr=err, color=["tab:green" if v >= 1 else "tab:red" for v in vals], alpha=0.8, capsize=4)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, [f"{r['candidate']}\nvs {r['baseline']}" for r in rows], fontsize=7)
    for yi, r in zip(y, rows):
        ax.text(r["speedup_high"], yi + 0.25, f" {r['speedup']:.2f}x [{r['speedup_low']:.2f}, {r['speedup_high']:.2f}]",
                va="center", fontsize=8)
    ax.set_xlim(0, max(r["speedup_high"] for r in rows) * 1.3)
    ax.set_xlabel(f"speedup = median(baseline) / median(candidate), {rows[0]['confidence']:.0%} bootstrap CI")
    ax.set_title(f"{device}: paired speedup{caption}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _memory(plt: Any, device: str, ms: Sequence[Measurement], path: Path) -> None:
    keys = [("rss_before_load", "RSS before load"), ("rss_after_load", "RSS after load"),
            ("peak_rss_steady", "peak RSS (steady)"), ("artifact", "artifact file")]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(ms)))
    height = 0.8 / len(keys)
    for k, (key, name) in enumerate(keys):
        vals = [(m.artifact_bytes if key == "artifact" else (m.memory.get(key) or 0)) / MIB for m in ms]
        ax.barh([i + (k - 1.5) * height for i in range(len(ms))], vals, height=height, label=name)
    ax.set_yticks(range(len(ms)), [m.label for m in ms], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{device}: memory (worker process)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_serialised
def plot_compare(pairs: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]], path: Path) -> str | None:
    """One figure for several devices: paired speedups (with CIs) and median latency per configuration."""
    try:
        plt = _pyplot()
    except ImportError:
        return MISSING_NOTE
    devices = list(dict.fromkeys(r["device"] for r in [*pairs, *summaries]))
    panels = 2 if pairs else 1
    fig, axes = plt.subplots(1, panels, squeeze=False, figsize=(6.5 * panels, 1.5 + 0.5 * max(
        len({_pair_name(r) for r in pairs}) * len(devices), len({r["label"] for r in summaries}) * 0.6 * len(devices), 3)))
    width = 0.8 / max(1, len(devices))
    if pairs:
        ax = axes[0, 0]
        names = list(dict.fromkeys(_pair_name(r) for r in pairs))
        for d, dev in enumerate(devices):
            rows = {_pair_name(r): r for r in pairs if r["device"] == dev}
            y = [i + (d - (len(devices) - 1) / 2) * width for i, n in enumerate(names) if n in rows]
            sel = [rows[n] for n in names if n in rows]
            ax.barh(y, [r["speedup"] for r in sel], height=width, label=dev, capsize=3,
                    xerr=[[r["speedup"] - r["speedup_low"] for r in sel], [r["speedup_high"] - r["speedup"] for r in sel]])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("paired speedup (baseline / candidate), bootstrap CI")
        ax.legend(fontsize=7)
    ax = axes[0, -1]
    labels = list(dict.fromkeys(r["label"] for r in summaries))
    for d, dev in enumerate(devices):
        rows = {r["label"]: r for r in summaries if r["device"] == dev}
        y = [i + (d - (len(devices) - 1) / 2) * width for i, n in enumerate(labels) if n in rows]
        ax.barh(y, [rows[n]["median_ms"] for n in labels if n in rows], height=width, label=dev)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median latency (ms, log scale)")
    ax.legend(fontsize=7)
    emulated = {r["device"] for r in [*pairs, *summaries] if r.get("emulated")}
    fig.suptitle("sfedge compare: " + ", ".join(f"{d} ({EMULATED_LABEL})" if d in emulated else d for d in devices),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _pair_name(row: dict[str, Any]) -> str:
    return f"{row['candidate']} vs {row['baseline']}"


@_serialised
def plot_sweep(points: Sequence[dict[str, Any]], path: Path, title: str) -> str | None:
    """Latency against parity (and against held-out Dice where present), Pareto front drawn as a step line."""
    try:
        plt = _pyplot()
    except ImportError:
        return MISSING_NOTE
    axes_spec = [("dice_agreement", "mask Dice agreement with the vanilla model")]
    if any(p.get("holdout_dice") is not None for p in points):
        axes_spec.append(("holdout_dice", "held-out Dice (pseudo-labels)"))
    fig, axes = plt.subplots(1, len(axes_spec), squeeze=False, figsize=(5.5 * len(axes_spec), 4.2))
    for ax, (key, name) in zip(axes[0], axes_spec):
        pts = [p for p in points if p.get(key) is not None and p.get("median_ms") is not None]
        front = {id(p) for p in pareto_front(pts, key)}
        for p in pts:
            on = id(p) in front
            planned = p.get("kind") == "planned"  # sfedge plan's points: per-layer ranks from the latency table
            ax.scatter(p["median_ms"], p[key], s=60 if on else 35,
                       color=("tab:blue" if planned else "tab:red") if on else ("lightsteelblue" if planned else "tab:gray"),
                       marker="D" if planned else ("s" if p.get("s") is None else "o"), zorder=3)
            ax.annotate(p["name"], (p["median_ms"], p[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if any(p.get("kind") == "planned" for p in pts):
            ax.scatter([], [], marker="D", color="tab:blue", label="planned (per-layer ranks)")
            ax.scatter([], [], marker="o", color="tab:red", label="uniform s")
        fr = sorted((p for p in pts if id(p) in front), key=lambda p: p["median_ms"])
        if len(fr) > 1:
            ax.step([p["median_ms"] for p in fr], [p[key] for p in fr], where="post", color="tab:red", alpha=0.6,
                    label="Pareto front")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel("median latency (ms)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


@_serialised
def plot_layers(device: str, comparisons: Sequence[dict[str, Any]], path: Path) -> str | None:
    """Per-layer time of each candidate against its baseline (one panel per comparison), GMAC/s at the bars."""
    try:
        plt = _pyplot()
    except ImportError:
        return MISSING_NOTE
    n = len(comparisons)
    heights = [max(3.0, 0.28 * len(c["rows"]) + 1.2) for c in comparisons]
    fig, axes = plt.subplots(n, 1, squeeze=False, figsize=(9, sum(heights)), height_ratios=heights)
    for ax, c in zip(axes[:, 0], comparisons):
        rows = [r for r in c["rows"] if (r["candidate_ms"] or 0) > 0 or (r["baseline_ms"] or 0) > 0]
        y = np.arange(len(rows))
        base = [r["baseline_ms"] or 0 for r in rows]
        cand = [r["candidate_ms"] or 0 for r in rows]
        ax.barh(y - 0.2, base, height=0.4, color="tab:gray", label=c["baseline_label"])
        ax.barh(y + 0.2, cand, height=0.4, color="tab:red", label=c["candidate_label"])
        for yi, r, v in zip(y, rows, cand):
            if r.get("candidate_gmacs"):
                ax.text(v, yi + 0.2, f" {r['candidate_gmacs']:.0f} GMAC/s", va="center", fontsize=6)
        ax.set_yticks(y, [r["layer"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"median ms per inference ({c['source']})")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{device}: time per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
