"""Merge profile reports from several devices into one table and one figure.

Rows are what was measured (paired comparisons first, then configurations),
columns are devices, so "SFConv is 2.3x faster on the Pi but 1.1x on the
Jetson" reads across a line.  Numbers are taken from each report as measured;
nothing is re-normalised across devices (paired ratios already are).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfedge.console import table
from sfedge.errors import ConfigError
from sfedge.fileio import atomic_dir, write_json
from sfedge.profile.emulation import EMULATED_LABEL
from sfedge.profile.plots import plot_compare
from sfedge.profile.report import Report, load_report
from sfedge.profile.stats import CV_WARNING
from sfedge.profile.tables import markdown_page, markdown_table, write_csv

__all__ = ["Comparison", "compare_reports", "OUTPUT_KIND"]

OUTPUT_KIND = "compare"  # the -o marker (sfedge.fileio.check_output_dir)


@dataclass
class Comparison:
    """Several devices' reports side by side."""

    devices: list[str]
    sources: list[str]
    summary: list[dict[str, Any]] = field(default_factory=list)  # summary rows of every report (with device)
    pairs: list[dict[str, Any]] = field(default_factory=list)  # pair rows of every report (with device)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": "sfedge-compare/1", "devices": self.devices, "sources": self.sources,
                "pairs": self.pairs, "summary": self.summary, "notes": self.notes}

    def grid(self) -> tuple[list[str], list[list[Any]]]:
        """(header, rows): one row per comparison or configuration, one column per device."""
        emulated = {r["device"] for r in [*self.pairs, *self.summary] if r.get("emulated")}
        header = ["measured", *[f"{d} ({EMULATED_LABEL})" if d in emulated else d for d in self.devices]]
        rows: list[list[Any]] = []
        for name in dict.fromkeys(f"{p['candidate']} vs {p['baseline']}" for p in self.pairs):
            cells = {p["device"]: f"{p['speedup']:.2f}x [{p['speedup_low']:.2f}, {p['speedup_high']:.2f}]"
                     for p in self.pairs if f"{p['candidate']} vs {p['baseline']}" == name}
            rows.append([f"speedup {name}", *[cells.get(d, "-") for d in self.devices]])
        for label in dict.fromkeys(s["label"] for s in self.summary):
            cells = {s["device"]: f"{s['median_ms']:.3f} ms" + (" (noisy)" if s["cv"] > CV_WARNING else "")
                     for s in self.summary if s["label"] == label}
            rows.append([f"median {label}", *[cells.get(d, "-") for d in self.devices]])
        return header, rows

    def tables(self) -> list[Any]:
        header, rows = self.grid()
        return [table("sfedge compare: paired speedup (baseline/candidate, CI) and median latency", header, rows)]

    def markdown(self, figure: str | None = None) -> str:
        header, rows = self.grid()
        lines = ["# sfedge compare", "", f"Devices: {', '.join(self.devices)}", "", *markdown_table(header, rows)]
        return markdown_page(lines, [figure] if figure else [], self.notes)

    def write(self, folder: str | os.PathLike[str], plots: bool = True) -> Path:
        """compare.json, compare_pairs.csv, compare_summary.csv, compare.md and compare.png into ``folder``.

        An existing folder is replaced only when it is an earlier comparison
        (sfedge's marker); any other non-empty folder is refused.
        """
        folder = Path(folder)
        with atomic_dir(folder, kind=OUTPUT_KIND) as tmp:
            write_json(tmp / "compare.json", self.as_dict())
            write_csv(tmp / "compare_pairs.csv", self.pairs)
            write_csv(tmp / "compare_summary.csv", self.summary)
            figure = None
            if plots:
                note = plot_compare(self.pairs, self.summary, tmp / "compare.png")
                if note:
                    self.notes.append(note)
                else:
                    figure = "compare.png"
            (tmp / "compare.md").write_text(self.markdown(figure))
        return folder


def compare_reports(paths: Sequence[str | os.PathLike[str]]) -> Comparison:
    """Load each report (folder or report.json) and merge them; repeated device names get a suffix."""
    if not paths:
        raise ConfigError("no reports to compare", "give one or more folders written by `sfedge profile -o`")
    reports: list[Report] = [load_report(p) for p in paths]
    devices: list[str] = []
    comparison = Comparison(devices=devices, sources=[str(p) for p in paths])
    for report in reports:
        name = report.device
        k = 2
        while name in devices:
            name, k = f"{report.device} ({k})", k + 1
        report.device = name
        devices.append(name)
        comparison.summary += report.summary_rows()
        comparison.pairs += report.pair_rows()
        comparison.notes += [f"{name}: {n}" for n in report.notes]
    return comparison
