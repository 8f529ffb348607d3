"""`make bench`: run every benchmark section and write one report.

Each section is a module in bench/ with ``run(out_dir) -> str`` that writes its raw
results as JSON into out_dir and returns a Markdown section.  Sections run in
order in fresh subprocesses (so one section's threads and allocations do not
colour the next one's timings); the report is reports/bench/REPORT.md.

    python bench/run.py --out reports/bench [--only models,tflite]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

SECTIONS = ("models", "onnx_qdq", "tflite", "int8", "tensorrt", "profiler", "factorizer", "fidelity",
            "third_party", "plan")
HERE = Path(__file__).resolve().parent


def _section(name: str, out: Path) -> None:
    mod = importlib.import_module(name)  # bench/ is on sys.path: it is this script's folder
    start = time.perf_counter()
    md = mod.run(out)
    (out / f"{name}.md").write_text(md.rstrip() + f"\n\n_section time: {time.perf_counter() - start:.0f} s_\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/bench")
    ap.add_argument("--only", help="comma-separated sections (default: all): " + ",".join(SECTIONS))
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        _section(args.section, out)
        return 0
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print(f"bench: unknown section(s) {', '.join(sorted(unknown))}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    status = {}
    for name in wanted:
        if not (HERE / f"{name}.py").exists():
            status[name] = "missing"
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, __file__, "--out", str(out), "--section", name])
        status[name] = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"bench: {name} {status[name]} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    parts = [
        "# sfedge benchmark report",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}). "
        "Absolute times drift on shared machines: compare the side-by-side ratios and medians.",
        "",
    ]
    for name in SECTIONS:  # sections not run this time keep their last report (each .md says its section time)
        md = out / f"{name}.md"
        if status.get(name, "ok") == "ok" and md.exists():
            parts.append(md.read_text())
        elif name in status:
            parts.append(f"## {name}\n\n{status[name]}\n")
    (out / "REPORT.md").write_text("\n".join(parts))
    (out / "status.json").write_text(json.dumps(status, indent=2))
    print(f"bench: wrote {out / 'REPORT.md'}", file=sys.stderr)
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
