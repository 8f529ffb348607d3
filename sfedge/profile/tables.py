"""Tables of profile results, for every output format: flat rows (CSV, JSON, terminal) and Markdown.

Shared by the profile report, ``compare`` and the rank sweep, and by the
plots, so none of them imports another to draw a table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfedge.profile.types import Measurement, Pairing

__all__ = ["summary_rows", "pair_rows", "write_csv", "markdown_table", "markdown_page", "nest_markdown",
           "latency_table_markdown"]


def summary_rows(device: str, measurements: Sequence[Measurement], *, emulated: bool = False) -> list[dict[str, Any]]:
    """One flat row per measurement (the CSV and the tables are built from these); ``emulated``: measured under an
    emulator, so no latency here is the device's."""
    rows = []
    for m in measurements:
        s = m.summary
        mem = m.memory
        rows.append({
            "device": device, "label": m.label, "model": m.model, "backend": m.backend,
            "precision": m.precision, "threads": m.threads, "n": s.n, "min_ms": s.min, "mean_ms": s.mean,
            "median_ms": s.median, "p90_ms": s.p90, "p99_ms": s.p99, "max_ms": s.max, "std_ms": s.std, "cv": s.cv,
            "drift": m.drift, "processes": len(m.per_process) or 1, "process_spread": m.process_spread,
            "import_ms": m.import_ms, "load_ms": m.load_ms, "first_ms": m.first_ms,
            "rss_before_load": mem.get("rss_before_load"), "rss_after_load": mem.get("rss_after_load"),
            "rss_after_first": mem.get("rss_after_first"), "peak_rss_steady": mem.get("peak_rss_steady"),
            "peak_rss_lifetime": mem.get("peak_rss_lifetime"), "artifact_bytes": m.artifact_bytes,
            "s": m.meta.get("s"), "artifact": m.artifact, "emulated": emulated,
        })
    return rows


def pair_rows(device: str, measurements: Sequence[Measurement], pairings: Sequence[Pairing], *,
              emulated: bool = False) -> list[dict[str, Any]]:
    """One flat row per paired comparison (``emulated`` as in :func:`summary_rows`)."""
    by_label = {m.label: m for m in measurements}
    rows = []
    for p in pairings:
        a, b = by_label[p.candidate], by_label[p.baseline]
        rows.append({
            "device": device, "candidate": p.candidate, "baseline": p.baseline, "backend": a.backend,
            "precision": a.precision, "median_candidate_ms": a.summary.median, "median_baseline_ms": b.summary.median,
            "ratio": p.ratio.ratio, "ratio_low": p.ratio.low, "ratio_high": p.ratio.high,
            "speedup": p.ratio.speedup, "speedup_low": p.ratio.speedup_low, "speedup_high": p.ratio.speedup_high,
            "confidence": p.ratio.confidence, "rounds": p.rounds, "block": p.block, "emulated": emulated,
        })
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path.write_text(buf.getvalue())


def markdown_page(lines: list[str], figures: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """A Markdown document: ``lines``, then the figures (PNG files beside it), then a Notes section."""
    out = list(lines)
    if figures:
        out += ["", *[f"![{Path(f).stem}]({f})" for f in figures]]
    if notes:
        out += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def nest_markdown(text: str, levels: int = 1) -> str:
    """``text`` with every heading ``levels`` deeper, to embed a report page as a section of another document."""
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in text.splitlines()) + "\n"


def latency_table_markdown(d: dict[str, Any]) -> list[str]:
    """A latency table (:meth:`sfedge.profile.latency_table.LatencyTable.as_dict`) for people: per layer, dense ms
    and each rank's ms (ratio to dense); then how well it predicts the whole models it was checked against."""
    runtime = ", ".join(f"{k} {v}" for k, v in (d.get("runtime") or {}).items())
    lines = [f"Latency table of {d['model']} on {d['target']} ({d['backend']} {d['precision']}, "
             f"{d.get('threads') or 'default'} threads, {runtime}).", "",
             "| layer | Ci->Co @ HxW | dense ms | rank: ms (ratio to dense) |", "|---|---|---|---|"]
    for e in d["layers"]:
        s = e["shape"]
        cells = ", ".join(f"{r}: {t['ms']:.3f} ({t['ratio']:.2f})" for r, t in e["ranks"].items())
        lines.append(f"| {e['name']} | {s['in_channels']}->{s['out_channels']} @ {s['input_hw'][0]}x{s['input_hw'][1]} | "
                     f"{e['dense_ms']:.3f} | {cells} |")
    lines += ["", f"Whole dense model: {d['whole_dense_ms']:.3f} ms; unchanged parts (whole minus the layers' isolated "
                  f"dense times): {d['rest_ms']:.3f} ms. Shapes measured now: {d.get('shapes_measured', 0)}, "
                  f"from the cache: {d.get('shapes_cached', 0)}."]
    if d.get("validation"):
        lines += ["", "| validation model | predicted ms | measured ms | error |", "|---|---|---|---|"]
        lines += [f"| {v['name']} | {v['predicted_ms']:.3f} | {v['measured_ms']:.3f} | {v['error']:+.1%} |"
                  for v in d["validation"]]
        if d.get("stated_error") is not None:
            lines += ["", f"Stated error (the worst on the uniform validation models, rounded up to the next 5%): "
                          f"{d['stated_error']:.0%}."]
    lines += [f"- {n}" for n in d.get("notes") or []]
    return lines
