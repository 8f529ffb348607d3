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
    from sfedge.profile.report import Report
    from sfedge.profile.schedule import profile_subjects
    from sfedge.profile.subjects import pair_up, subjects_from
    from sfedge.profile.tables import nest_markdown
    from sfedge.profile.types import MeasureConfig
    from sfedge.sweep import sweep

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

    raw = {"pairs": report.pair_rows(), "summary": report.summary_rows(), "host": report.host, "notes": report.notes,
           "sweeps": {b: r.as_dict() for b, r in sweeps.items()}}
    (out / "profile.json").write_text(json.dumps(raw, indent=2, default=str))
    md = ["## Profile: SFConv (s=0.25) vs vanilla demo U-Net on host-cpu (paired)", "",
          "The profiler's own report (full report with every raw sample and plots: `profile-host-cpu/`):", "",
          nest_markdown(report.markdown(), 2)]
    for backend, result in sweeps.items():
        md += [f"Rank sweep on host-cpu, {backend} fp32 (SVD + {FINETUNE_STEPS} fine-tuning steps per s; plot and "
               f"per-sample report: `sweep-host-cpu-{backend}/`):", "", nest_markdown(result.markdown(), 2)]
    return "\n".join(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args()
    sys.stdout.write(run(args.out) + "\n")
