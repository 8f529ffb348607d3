"""`sfedge profile`: latency and memory of bundles on this machine or over SSH, SFConv vs vanilla paired.

Runs with the runtime-only install (numpy, rich, psutil and the runtime):
nothing on this path imports torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sfedge.console import console, err_console, print_json, progress_bar
from sfedge.errors import ConfigError, RemoteError
from sfedge.fileio import check_output_dir
from sfedge.profile.compare import compare_reports
from sfedge.profile.latency_table import TABLE_MEASURE, is_kit, measure_kit
from sfedge.profile.layers import PROFILED_BACKENDS, compare_layers, measure_layers
from sfedge.profile.remote import RemoteOptions, profile_remote
from sfedge.profile.report import OUTPUT_KIND, Report, load_report
from sfedge.profile.schedule import profile_subjects
from sfedge.profile.subjects import pair_up, subjects_from
from sfedge.profile.types import MeasureConfig, Measurement, Pairing, Subject
from sfedge.progress import Progress

__all__ = ["register", "run", "default_out"]

EPILOG = """examples:
  sfedge profile bundles/unet-sfconv__host-cpu__fp32 --pair bundles/unet__host-cpu__fp32
      SFConv vs vanilla, every artifact of the bundle (ONNX Runtime and TFLite), alternating A B B A ...
  sfedge profile bundles/unet-sfconv__host-cpu__int8 --pair bundles/unet__host-cpu__int8 --backend tflite -o reports/int8
  sfedge profile model.onnx --runs 200 --min-seconds 5 --threads 1
  sfedge profile bundles/unet-sfconv__android-arm64__int8 --pair bundles/unet__android-arm64__int8 \\
      --remote pi@raspberrypi --remote me@pixel-termux --ssh-option Port=8022
      profile on two devices in parallel over SSH and bring the reports back (then: sfedge compare)
  sfedge profile bundles/unet-sfconv__host-cpu__fp32 --pair bundles/unet__host-cpu__fp32 --layers
      also time per layer (ONNX Runtime / TensorRT: their own profilers; TFLite: per-layer models), SFConv
      layers aligned with the vanilla layers of the same module path, with MACs and GMAC/s (layers.png)
  sfedge profile KIT
      measure a latency kit (made by `sfedge plan`) into a latency table

The report folder holds report.json (every raw sample), summary.csv, pairs.csv,
samples.csv, report.md and PNG plots (when matplotlib is installed)."""


def register(subparsers: Any, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders (or bare .onnx/.tflite/.engine files)")
    p.add_argument("--pair", action="append", default=[], metavar="BUNDLE",
                   help="baseline (vanilla) bundle to run alternately with each BUNDLE of the same backend, precision "
                        "and target (repeatable: one per precision)")
    p.add_argument("--backend", help="profile only this backend's artifact (default: every artifact in the bundle)")
    p.add_argument("--layers", action="store_true",
                   help="also report time per layer, aligned between each bundle and its --pair (report: 'Per layer', "
                        "layers.csv, layers.png)")
    MeasureConfig.add_arguments(p)
    p.add_argument("-o", "--out", type=Path,
                   help="report folder (default: reports/profile-<time>); an existing folder is replaced only if it "
                        "holds an earlier sfedge profile report, any other non-empty folder is refused")
    p.add_argument("--device", help="name for this device in reports (default: the host name)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout instead of tables")
    r = p.add_argument_group("remote devices (plain ssh/scp; ~/.ssh/config applies)")
    r.add_argument("--remote", action="append", default=[], metavar="USER@HOST",
                   help="profile on this SSH host instead (repeatable: hosts run in parallel)")
    r.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to ssh and scp as -o KEY=VALUE (e.g. Port=2222, IdentityFile=~/.ssh/pi)")
    r.add_argument("--ssh-config", help="ssh_config file to use instead of ~/.ssh/config (ssh -F)")
    r.add_argument("--remote-python", default="python3", help="Python on the remote that has sfedge (default python3)")
    r.add_argument("--install", action="store_true",
                   help="if sfedge or the runtime is missing on a remote, copy this sfedge over as a wheel and "
                        "pip-install it with only the runtimes the bundles need")
    r.add_argument("--keep-remote", action="store_true", help="leave the copied bundles and report on the remote")
    p.set_defaults(func=run)
    return p


def default_out(kind: str) -> Path:
    """reports/<kind>-<local time>: a fresh folder per run, so nothing is overwritten by accident."""
    return Path("reports") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    config = MeasureConfig.from_args(args)
    out = args.out or default_out("profile")
    if args.remote:
        return _run_remote(args, config, out)
    check_output_dir(out, OUTPUT_KIND)  # before minutes of measuring, not after
    kits = [b for b in args.bundles if is_kit(b)]
    if kits:
        return _run_kit(args, config, out, kits)

    subjects = [s for b in args.bundles for s in subjects_from(b, args.backend)]
    pairs = []
    if args.pair:
        baselines = [s for b in args.pair for s in subjects_from(b, args.backend)]
        pairs, subjects = pair_up(subjects, baselines), []
    with progress_bar("profile", enabled=not args.json) as progress:
        measurements, pairings = profile_subjects(subjects, pairs, config, progress)
        notes: list[str] = []
        layers = layer_comparisons(subjects, pairs, config, progress, notes) if args.layers else []
    report = Report.create(measurements, pairings, config, device=args.device, notes=notes)
    report.layers = layers
    report.write(out, plots=not args.no_plots)
    if args.json:
        print_json({"report": str(out), "device": report.device, "summary": report.summary_rows(),
                    "pairs": report.pair_rows(), "notes": report.notes})
        return 0
    for t in report.tables():
        console.print(t)
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    console.print(f"report: {out}")
    return 0


TFLITE_LAYERS_NOTE = ("TFLite has no profiler sfedge can read: its per-layer times come from per-layer models, made on "
                      "the workstation (torch, litert-torch); run `sfedge profile --layers` there (with --remote for a "
                      "device)")


def layer_comparisons(subjects: list[Subject], pairs: list[tuple[Subject, Subject]], config: MeasureConfig,
                      progress: Progress | None, notes: list[str], remote: list[str] | None = None,
                      options: RemoteOptions | None = None) -> list[dict]:
    """Per-layer comparisons for ``--layers``: the runtime's profiler where it has one, per-layer models otherwise."""
    out: list[dict] = []
    table_pairs = []
    for cand, base in pairs:
        if cand.backend in PROFILED_BACKENDS:
            if not remote:
                out.append(compare_layers(measure_layers(cand, config, progress), measure_layers(base, config, progress)))
        else:
            table_pairs.append((cand, base))
    for s in subjects:
        if s.backend in PROFILED_BACKENDS:
            if not remote:
                out.append(compare_layers(measure_layers(s, config, progress), None))
        elif not pairs:
            notes.append(f"{s.label}: per-layer TFLite times need --pair (each layer is timed against the vanilla one)")
    if table_pairs:
        try:
            from sfedge.plan import table_layer_comparisons
        except ImportError:
            notes.append(TFLITE_LAYERS_NOTE)
        else:
            from dataclasses import replace

            table_config = replace(TABLE_MEASURE, threads=config.threads)
            out += table_layer_comparisons(table_pairs, table_config, remote=remote or (), remote_options=options,
                                           progress=progress)
    return out


def _run_kit(args: argparse.Namespace, config: MeasureConfig, out: Path, kits: list[str]) -> int:
    """Measure a latency kit (made by `sfedge plan` on the workstation) into a latency table, in a report."""
    if len(args.bundles) != 1 or args.pair or args.layers:
        raise ConfigError("a latency kit is measured on its own", "give only the kit folder (no --pair, --layers)")
    seen: dict[str, list] = {}

    def keep(measurements: list[Measurement], pairings: list[Pairing]) -> None:
        seen["m"], seen["p"] = measurements, pairings

    with progress_bar("latency table", enabled=not args.json) as progress:
        table = measure_kit(kits[0], config, progress=progress, on_measurements=keep)
    report = Report.create(seen["m"], seen["p"], config, device=args.device, notes=list(table.notes))
    report.table = table.as_dict()
    report.write(out, plots=not args.no_plots)
    if args.json:
        print_json({"report": str(out), "device": report.device, "stated_error": table.stated_error,
                    "whole_dense_ms": table.whole_dense_ms, "layers": len(table.layers), "notes": report.notes})
        return 0
    console.print("\n".join(table.markdown()))
    console.print(f"report: {out}")
    return 0


def _run_remote(args: argparse.Namespace, config: MeasureConfig, out: Path) -> int:
    options = RemoteOptions(ssh_options=list(args.ssh_option), ssh_config=args.ssh_config, python=args.remote_python,
                            install=args.install, keep=args.keep_remote)
    with progress_bar("remote profile", enabled=not args.json) as progress:
        results = profile_remote(list(dict.fromkeys(args.remote)), args.bundles, args.pair, backend=args.backend,
                                 config=config, out=out, options=options, plots=not args.no_plots, progress=progress,
                                 layers=args.layers)
        if args.layers and args.pair:  # TFLite: per-layer models made here, measured on each device
            subjects = [s for b in args.bundles for s in subjects_from(b, args.backend)]
            baselines = [s for b in args.pair for s in subjects_from(b, args.backend)]
            for r in results:
                if r.report_dir is None:
                    continue
                notes: list[str] = []
                extra = layer_comparisons([], pair_up(subjects, baselines), config, progress, notes, [r.host], options)
                if extra or notes:
                    report = load_report(r.report_dir)
                    report.layers += extra
                    report.notes = [n for n in report.notes if n != TFLITE_LAYERS_NOTE] + notes
                    report.write(r.report_dir, plots=not args.no_plots)
    done = [r for r in results if r.report_dir]
    comparison = compare_reports([r.report_dir for r in done])
    if len(done) > 1:
        comparison.write(out / "compare", plots=not args.no_plots)
    if args.json:
        print_json({"reports": {r.host: str(r.report_dir) for r in done}, "errors": {r.host: r.error for r in results
                    if r.error}, "installed": {r.host: r.installed for r in results if r.installed},
                    "summary": comparison.summary, "pairs": comparison.pairs, "notes": comparison.notes})
    else:
        for t in comparison.tables():
            console.print(t)
        for note in comparison.notes:
            err_console.print(f"[yellow]note:[/] {note}")
        for r in done:
            console.print(f"{r.host}: report {r.report_dir}" + (f" (installed {', '.join(r.installed)})" if r.installed else ""))
    failed = [r for r in results if r.error]
    if failed:  # the others' reports are written; fail with the first host's one-line error
        raise RemoteError("; ".join(r.error for r in failed))
    return 0
