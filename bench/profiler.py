"""Profile section of `make bench`: the demo pair on host-cpu, SFConv (s=0.25) vs vanilla, paired; and a rank sweep.

* Paired runs (A B B A ..., one worker process per configuration): ONNX Runtime
  fp32 and int8, TFLite/XNNPACK fp32 and int8, each SFConv artifact against the
  vanilla artifact of the same backend and precision, with the ratio of
  medians and its 95% bootstrap CI.
* A rank sweep of the trained vanilla demo U-Net at s = 1, 0.5, 0.25, 0.125
  (truncated SVD, then a short fine-tune on the fundus demo), built for
  host-cpu and measured in one rotating run per backend.

    python bench/profiler.py --out reports/bench     (or: make bench)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

S_VALUES = (1.0, 0.5, 0.25, 0.125)
FINETUNE_STEPS = 200
PAIRS = (("fp32", None), ("int8", None))  # (precision, backend filter): every artifact of the host-cpu bundles


def run(out: Path) -> str:
    from sfedge.build import build_bundle
    from sfedge.demo import demo_checkpoints
    from sfedge.errors import SfedgeError
    from sfedge.profile.measure import MeasureConfig, pair_up, profile_subjects, subjects_from
    from sfedge.profile.report import Report, pair_rows, summary_rows
    from sfedge.profile.sweep import sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundles_dir = out / "bundles"
    demo = demo_checkpoints()
    config = MeasureConfig(runs=100, min_seconds=2.0, warmup_runs=5, warmup_seconds=0.5)

    pairs, notes = [], []
    for precision, backend in PAIRS:
        try:
            sf = build_bundle(demo["unet-sfconv"], "host-cpu", precision, out_dir=bundles_dir).path
            van = build_bundle(demo["unet"], "host-cpu", precision, out_dir=bundles_dir).path
        except SfedgeError as e:  # e.g. an int8 artifact that misses its parity tolerance: report, go on
            notes.append(f"{precision} bundles not built: {e}")
            continue
        pairs += pair_up(subjects_from(sf, backend), subjects_from(van, backend))
    measurements, pairings = profile_subjects([], pairs, config)
    report = Report.create(measurements, pairings, config, device="host-cpu", notes=notes)
    report.write(out / "profile-host-cpu")

    sweeps = {}
    for backend in ("onnxruntime", "tflite"):
        result = sweep(demo["unet"], "host-cpu", S_VALUES, precision="fp32", backend=backend, bundles_dir=bundles_dir,
                       config=MeasureConfig(runs=60, min_seconds=1.5, warmup_runs=3, warmup_seconds=0.5),
                       finetune_steps=FINETUNE_STEPS)
        result.write(out / f"sweep-host-cpu-{backend}")
        sweeps[backend] = result

    raw = {"pairs": pair_rows(report), "summary": summary_rows(report), "host": report.host, "notes": report.notes,
           "sweeps": {b: r.as_dict() for b, r in sweeps.items()}}
    (out / "profile.json").write_text(json.dumps(raw, indent=2, default=str))
    return _markdown(report, sweeps)


def _markdown(report, sweeps) -> str:
    from sfedge.console import fmt_bytes
    from sfedge.profile.report import pair_rows, summary_rows

    md = [
        "## Profile: SFConv (s=0.25) vs vanilla demo U-Net on host-cpu (paired)",
        "",
        f"{report.host.get('cpu')}, {report.host.get('cpu_count')} cores, load average at start "
        f"{report.host.get('load_average')}. Each configuration runs in {report.config['processes']} worker processes; "
        "a pair's processes take turns in blocks of about 50 ms (A1 B1 A2 B2 A3 B3, reversed every round), at "
        "least 20 rounds, after a warm-up of at least "
        f"{report.config['warmup_runs']} runs and {report.config['warmup_seconds']} s; at least {report.config['runs']} "
        f"runs and {report.config['min_seconds']} s each. Input 1x3x256x256, {report.measurements[0].threads} threads.",
        "",
        "| backend | precision | SFConv median ms | vanilla median ms | speedup (vanilla/SFConv) | 95% CI | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in pair_rows(report):
        md.append(f"| {r['backend']} | {r['precision']} | {r['median_candidate_ms']:.2f} | {r['median_baseline_ms']:.2f} "
                  f"| {r['speedup']:.2f}x | [{r['speedup_low']:.2f}, {r['speedup_high']:.2f}] | {r['rounds']} |")
    md += ["", "| configuration | p90 ms | p99 ms | CV | process spread | load ms | first inference ms | RSS after load "
           "| peak RSS | file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(report):
        md.append(f"| {r['label']} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['cv']:.1%} | "
                  f"{r['process_spread']:.1%} | {r['load_ms']:.1f} | "
                  f"{r['first_ms']:.1f} | {fmt_bytes(r['rss_after_load'])} | {fmt_bytes(r['peak_rss_steady'])} | "
                  f"{fmt_bytes(r['artifact_bytes'])} |")
    md += ["", "Full report with every raw sample and plots: `profile-host-cpu/`."]
    for backend, result in sweeps.items():
        md += ["", f"### Rank sweep on host-cpu, {backend} fp32 (SVD + {FINETUNE_STEPS} fine-tuning steps per s)", "",
               "| point | GMAC | median ms | ratio to vanilla [95% CI] | mask Dice vs vanilla | held-out Dice | "
               "on front (parity / Dice) |", "|---|---|---|---|---|---|---|"]
        front_p = {p.name for p in result.front("dice_agreement")}
        front_d = {p.name for p in result.front("holdout_dice")}
        for p in result.points:
            ratio = f"{p.ratio:.3f} [{p.ratio_low:.3f}, {p.ratio_high:.3f}]" if p.ratio is not None else "1 (baseline)"
            md.append(f"| {p.name} | {(p.macs or 0) / 1e9:.3f} | "
                      f"{p.median_ms:.2f} | {ratio} | {_num(p.dice_agreement)} | {_num(p.holdout_dice)} | "
                      f"{'yes' if p.name in front_p else 'no'} / {'yes' if p.name in front_d else 'no'} |"
                      if p.median_ms is not None else f"| {p.name} | - | - | {p.error} | - | - | - |")
        md.append(f"\nPlot and per-sample report: `sweep-host-cpu-{backend}/`.")
    if report.notes:
        md += ["", "Notes:", *[f"- {n}" for n in report.notes]]
    return "\n".join(md)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args()
    sys.stdout.write(run(args.out) + "\n")
