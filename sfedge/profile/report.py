"""Profile reports: one folder per run with every raw sample, for people and for machines.

A report folder holds ``report.json`` (schema ``sfedge-profile/1``: the host,
the measurement settings, every measurement with all raw samples, the paired
ratios), ``summary.csv`` (one row per configuration), ``pairs.csv``,
``samples.csv`` (every timed inference, long format), ``report.md`` and the
PNG plots.  The folder is written under a temporary name and renamed into
place, so an interrupted run leaves no report that looks whole.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import sfedge
from sfedge.console import fmt_bytes, table
from sfedge.errors import SfedgeError
from sfedge.fileio import atomic_dir, read_schema_json, write_json
from sfedge.profile.emulation import EMULATED_LABEL, emulation_info, latency_caption
from sfedge.profile.layers import comparison_markdown
from sfedge.profile.plots import plot_layers, write_report_plots
from sfedge.profile.stats import CV_WARNING
from sfedge.profile.tables import (
    latency_table_markdown,
    markdown_page,
    markdown_table,
    pair_rows,
    summary_rows,
    write_csv,
)
from sfedge.profile.types import MeasureConfig, Measurement, Pairing

__all__ = ["SCHEMA", "REPORT_JSON", "OUTPUT_KIND", "Report", "host_info", "load_report"]

SCHEMA = "sfedge-profile/1"
OUTPUT_KIND = "profile"  # the -o marker (sfedge.fileio.check_output_dir)
REPORT_JSON = "report.json"
MIB = 1024 * 1024


@dataclass
class Report:
    """The result of one ``sfedge profile`` run on one device."""

    device: str
    host: dict[str, Any]
    config: dict[str, Any]
    measurements: list[Measurement]
    pairings: list[Pairing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    schema: str = SCHEMA
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer comparisons (`--layers`), see profile.layers
    table: dict[str, Any] | None = None  # a latency table, when the run measured a latency kit

    @classmethod
    def create(cls, measurements: list[Measurement], pairings: list[Pairing], config: MeasureConfig,
               device: str | None = None, notes: list[str] | None = None) -> Report:
        """A report stamped with this host's facts and the time now; notes gathered from the measurements."""
        host = host_info()
        gathered = list(notes or [])
        if host.get("emulated"):
            gathered.append(f"measured under emulation ({', '.join(host['emulation']['detected_by'])}): every latency "
                            f"here is {EMULATED_LABEL}; it checks the device path, never the device's speed")
        noisy = [f"{m.label} ({m.summary.cv:.0%})" for m in measurements if m.summary.noisy]
        if noisy:
            gathered.append(f"coefficient of variation above {CV_WARNING:.0%} for {', '.join(noisy)}: the machine is "
                            "noisy or throttling; close other work or fix the clock governor, and trust the paired "
                            "ratios (their CIs account for it) over single medians")
        for m in measurements:
            for n in m.notes:
                if n not in gathered:
                    gathered.append(n)
        return cls(device=device or host["hostname"], host=host, config=config.as_dict(), measurements=measurements,
                   pairings=pairings, notes=gathered, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def summary_rows(self) -> list[dict[str, Any]]:
        """One flat row per measurement (:func:`sfedge.profile.tables.summary_rows`)."""
        return summary_rows(self.device, self.measurements, emulated=bool(self.host.get("emulated")))

    def pair_rows(self) -> list[dict[str, Any]]:
        """One flat row per paired comparison (:func:`sfedge.profile.tables.pair_rows`)."""
        return pair_rows(self.device, self.measurements, self.pairings, emulated=bool(self.host.get("emulated")))

    def measurement(self, label: str) -> Measurement:
        for m in self.measurements:
            if m.label == label:
                return m
        raise KeyError(label)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "created": self.created, "device": self.device, "host": self.host,
            "config": self.config, "measurements": [m.as_dict() for m in self.measurements],
            "pairings": [p.as_dict() for p in self.pairings], "notes": list(self.notes),
            **({"layers": self.layers} if self.layers else {}), **({"table": self.table} if self.table else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(
            device=d["device"], host=d.get("host", {}), config=d.get("config", {}),
            measurements=[Measurement.from_dict(m) for m in d["measurements"]],
            pairings=[Pairing.from_dict(p) for p in d.get("pairings", [])], notes=list(d.get("notes", [])),
            created=d.get("created", ""), schema=d.get("schema", SCHEMA), layers=list(d.get("layers") or []),
            table=d.get("table"),
        )

    # -- writing ---------------------------------------------------------------------
    def write(self, folder: str | os.PathLike[str], plots: bool = True) -> list[Path]:
        """Write the report folder (replacing an older one only once the new one is complete); returns its files.

        An existing folder is replaced only when it is an earlier profile report
        (it carries sfedge's marker); any other non-empty folder is refused.
        """
        folder = Path(folder)
        with atomic_dir(folder, kind=OUTPUT_KIND) as tmp:
            if plots:  # first, so a "no matplotlib" note reaches every file
                note = write_report_plots(self.device, self.measurements, self.pair_rows(), tmp,
                                          caption=latency_caption(self.host))
                if note and note not in self.notes:
                    self.notes.append(note)
            if plots and self.layers:
                note = plot_layers(self.device, self.layers, tmp / "layers.png")
                if note and note not in self.notes:
                    self.notes.append(note)
            write_json(tmp / REPORT_JSON, self.as_dict())
            if self.layers:
                write_csv(tmp / "layers.csv", [
                    {"device": self.device, "candidate": c["candidate_label"], "baseline": c["baseline_label"],
                     "source": c["source"], **{k: v for k, v in r.items() if not k.endswith("_ops")}}
                    for c in self.layers for r in c["rows"]])
            write_csv(tmp / "summary.csv", self.summary_rows())
            write_csv(tmp / "pairs.csv", self.pair_rows())
            write_csv(tmp / "samples.csv", [
                {"device": self.device, "label": m.label, "index": i, "round": r,
                 "start_s": m.starts_s[i] if i < len(m.starts_s) else None, "ms": round(v, 6)}
                for m in self.measurements for i, (v, r) in enumerate(zip(m.samples_ms, m.rounds))
            ])
            (tmp / "report.md").write_text(self.markdown(sorted(f.name for f in tmp.glob("*.png"))))
        return sorted(folder.iterdir())

    def markdown(self, plots: list[str] | tuple[str, ...] = ()) -> str:
        """The report as Markdown tables (summary, pairs, memory, notes)."""
        h = self.host
        lines = [
            f"# sfedge profile: {self.device}", "",
            f"{self.created} · {h.get('cpu') or h.get('machine')} · {h.get('cpu_count')} cores · "
            f"{h.get('platform')} · sfedge {h.get('sfedge')}", "",
            f"Warm-up ≥ {self.config.get('warmup_runs')} runs and {self.config.get('warmup_seconds')} s per process; "
            f"measured ≥ {self.config.get('runs')} runs and {self.config.get('min_seconds')} s per configuration, "
            f"in {self.config.get('processes', 1)} worker processes each (rotated, so their differences enter the "
            "CIs).", "",
        ]
        if self.pairings:
            lines += [f"## Paired comparisons (alternating A B B A ...){latency_caption(h)}", ""]
            rows = self.pair_rows()
            lines += markdown_table(
                ["candidate", "baseline", "median A ms", "median B ms", "speedup B/A", f"{_ci_pct(self)} CI", "rounds"],
                [[r["candidate"], r["baseline"], f"{r['median_candidate_ms']:.3f}", f"{r['median_baseline_ms']:.3f}",
                  f"{r['speedup']:.3f}x", f"[{r['speedup_low']:.3f}, {r['speedup_high']:.3f}]", r["rounds"]]
                 for r in rows])
            lines.append("")
        lines += [f"## Latency (ms){latency_caption(h)}", ""]
        lines += markdown_table(
            ["configuration", "n", "min", "median", "mean", "p90", "p99", "std", "CV", "process spread", "load ms",
             "first ms"],
            [[r["label"], r["n"], f"{r['min_ms']:.3f}", f"{r['median_ms']:.3f}", f"{r['mean_ms']:.3f}",
              f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['std_ms']:.3f}",
              f"{r['cv']:.1%}" + (" ⚠" if r["cv"] > CV_WARNING else ""), f"{r['process_spread']:.1%}",
              f"{r['load_ms']:.1f}", f"{r['first_ms']:.1f}"]
             for r in self.summary_rows()])
        lines += ["", "Process spread: (max - min) / median of the per-process medians. Load and first-run times "
                  "are the first process's (cold page cache)."]
        lines += ["", "## Memory", ""]
        lines += markdown_table(
            ["configuration", "artifact", "RSS before load", "after load", "after 1st run", "peak (sampled)",
             "peak (kernel high-water)", "runtime-reported"],
            [[m.label, fmt_bytes(m.artifact_bytes), fmt_bytes(m.memory.get("rss_before_load")),
              fmt_bytes(m.memory.get("rss_after_load")), fmt_bytes(m.memory.get("rss_after_first")),
              fmt_bytes(m.memory.get("peak_rss_steady")), fmt_bytes(m.memory.get("peak_rss_lifetime")),
              _runtime_memory(m.memory.get("runtime") or {})] for m in self.measurements])
        if self.layers:
            lines += ["", "## Per layer", "", "Time per layer from the runtime's own profiler (ONNX Runtime, TensorRT) "
                      "or from per-layer models (TFLite), aligned by module path: an SFConv pair (conv_a, conv_b) "
                      "is one row with the dense conv of the same path. Speed-up = baseline / candidate; achieved = "
                      "speed-up / MAC ratio.", ""]
            for c in self.layers:
                lines += comparison_markdown(c) + [""]
        if self.table:
            lines += ["", "## Latency table", "", *latency_table_markdown(self.table)]
        if plots:
            lines += ["", "## Plots"]
        return markdown_page(lines, plots, self.notes)

    # -- terminal --------------------------------------------------------------------
    def tables(self) -> list[Any]:
        """Rich tables for the terminal: paired ratios first (the headline), then latency and memory."""
        out = []
        if self.pairings:
            out.append(table(
                f"{self.device}: paired runs (A B B A ...), speedup = median B / median A, {_ci_pct(self)} bootstrap CI"
                f"{latency_caption(self.host)}",
                ["candidate (A)", "baseline (B)", "median A ms", "median B ms", "speedup [CI]", "rounds"],
                [[r["candidate"], r["baseline"], r["median_candidate_ms"], r["median_baseline_ms"],
                  f"{r['speedup']:.3f}x [{r['speedup_low']:.3f}, {r['speedup_high']:.3f}]", r["rounds"]]
                 for r in self.pair_rows()]))
        out.append(table(
            f"{self.device}: latency (ms) and memory{latency_caption(self.host)}",
            ["configuration", "median", "p90", "p99", "CV", "load", "1st run", "peak RSS", "file"],
            [[r["label"], r["median_ms"], r["p90_ms"], r["p99_ms"], f"{r['cv']:.1%}", r["load_ms"], r["first_ms"],
              fmt_bytes(r["peak_rss_steady"]), fmt_bytes(r["artifact_bytes"])] for r in self.summary_rows()],
            caption="peak RSS: sampled steady-state peak of the configuration's own worker process",
        ))
        return out


def _ci_pct(report: Report) -> str:
    return f"{float(report.config.get('confidence', 0.95)):.0%}"


def _runtime_memory(info: dict[str, Any]) -> str:
    shown = {k: v for k, v in info.items() if isinstance(v, (int, float)) and k.endswith(("bytes", "memory"))}
    return ", ".join(f"{k}={fmt_bytes(v)}" for k, v in shown.items()) or "-"


def load_report(path: str | os.PathLike[str]) -> Report:
    """A report from its folder or its report.json (SfedgeError when it is not one)."""
    p = Path(path)
    f = p / REPORT_JSON if p.is_dir() else p
    if not f.is_file():
        raise SfedgeError(f"{p} is not a profile report (no {REPORT_JSON})", "give a folder written by `sfedge profile -o`")
    doc = read_schema_json(f, SCHEMA, SfedgeError, "re-run sfedge profile")
    try:
        return Report.from_dict(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a report edited by hand or from elsewhere
        raise SfedgeError(f"{f} is not a complete profile report ({type(e).__name__}: {e})",
                          "re-run sfedge profile") from e


def host_info() -> dict[str, Any]:
    """Facts about the machine measured on (CPU model, cores, memory, load, Jetson model/L4T where present)."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
        "python": platform.python_version(), "sfedge": sfedge.__version__, "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total, "cpu": _cpu_model(),
    }
    info.update(emulation_info())  # emulated: true (and how it was seen) under QEMU user mode
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    for key, path in (("device_model", "/proc/device-tree/model"), ("l4t", "/etc/nv_tegra_release")):
        try:
            info[key] = Path(path).read_text(errors="replace").strip("\x00\n ").splitlines()[0]
        except (OSError, IndexError):
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
