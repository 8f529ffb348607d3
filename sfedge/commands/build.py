"""`sfedge build`: bundles for one model on one or many targets and precisions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfedge.bundle import is_bundle
from sfedge.console import console, err_console, fmt_bytes, print_json, progress_bar, table
from sfedge.device_build import complete_bundle
from sfedge.errors import SfedgeError
from sfedge.targets import DEFAULT_TARGET, list_targets, load_target

EPILOG = """examples:
  sfedge build .cache/demo/unet-sfconv-*.safetensors --target host-cpu --precision int8
  sfedge build ckpt.safetensors --target jetson-orin-nano --target android-arm64 -o bundles/
  sfedge build ckpt.safetensors --all-targets --precision int8
  sfedge build unet-sfconv --target my-board.toml          (registry name: untrained weights)
  sfedge build bundles/unet__jetson-orin-nano__int8        (on the Jetson: build the engine into the bundle)

A bundle whose inputs (weights, target, precision, calibration set, toolchain, sfedge's
own code) are unchanged and whose files all still verify is not rebuilt; --force
rebuilds it.  A failed or interrupted build leaves no bundle folder behind, two builds
of one bundle wait for each other, and only a bundle folder is ever replaced.

Signing: --sign ~/.ssh/id_ed25519 writes manifest.json.sig (an SSH signature of the
manifest, which hashes every file); `sfedge verify --allowed-signers FILE` checks it.
On the device, `sfedge build <bundle>` verifies the bundle first (files, manifest,
and the signature with --allowed-signers or a target that requires one) and refuses
a changed one."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint (.safetensors), registry model name, or a bundle folder to complete on the device")
    p.add_argument("-t", "--target", action="append", default=[], help="target name or .toml path (repeatable; default host-cpu)")
    p.add_argument("--all-targets", action="store_true", help="build for every known target")
    p.add_argument("-p", "--precision", action="append", default=[],
                   help="fp32 | fp16 | int8 | int8-dynamic (repeatable; default: each target's default)")
    p.add_argument("-c", "--calibration", default="fundus-demo", help="calibration set name or spec path (default fundus-demo)")
    p.add_argument("-o", "--out", default="bundles", help="folder to write bundles into (default ./bundles)")
    p.add_argument("--force", action="store_true", help="rebuild even when the bundle is up to date")
    p.add_argument("--sign", metavar="KEY",
                   help="sign the manifest with this SSH key (private key, or KEY.pub held by ssh-agent)")
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="on the device: require the bundle to be signed by a key in this allowed_signers file")
    p.add_argument("--require-signature", action="store_true",
                   help="on the device: refuse unsigned bundles (signers from --allowed-signers, "
                        "$SFEDGE_ALLOWED_SIGNERS or the target)")
    p.add_argument("--dry-run", action="store_true", help="list the (target, precision) builds and stop")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if is_bundle(args.model):
        return _complete_on_device(args)
    targets = [t.name for t in list_targets()] if args.all_targets else (args.target or [DEFAULT_TARGET])
    resolved = [load_target(t) for t in targets]  # unknown targets fail before any work starts
    jobs = []
    for t in resolved:
        precisions = args.precision or [t.default_precision]
        for p in precisions:
            if args.all_targets and p not in t.precisions:
                continue
            t.check_precision(p)
            jobs.append((t, p))
    if args.dry_run:
        plan = [{"target": t.name, "precision": p, "backends": [b for b in t.backends]} for t, p in jobs]
        if args.json:
            print_json(plan)
        else:
            console.print(table("planned builds", ["target", "precision", "backends"],
                                [[j["target"], j["precision"], "+".join(j["backends"])] for j in plan]))
        return 0
    results, failures = [], []
    single = len(jobs) == 1
    from sfedge.build import build_bundle

    with progress_bar("build", total=len(jobs), enabled=not args.json) as bar:
        for i, (t, p) in enumerate(jobs):
            label = f"{t.name} {p}"

            def sub(message: str, fraction: float | None = None, i: int = i, label: str = label) -> None:
                bar(f"{label}: {message}", None if fraction is None else (i + fraction) / len(jobs))

            try:
                results.append(build_bundle(args.model, t, p, calibration=args.calibration, out_dir=Path(args.out),
                                            force=args.force, progress=sub, sign=args.sign))
            except SfedgeError as e:
                if single:
                    raise
                failures.append({"target": t.name, "precision": p, "error": str(e)})
    if args.json:
        print_json({"bundles": [r.summary() for r in results], "failures": failures})
    else:
        console.print(bundles_table("bundles", results))
        for r in results:
            for a in r.bundle.manifest["artifacts"]:
                for n in a.get("notes", []):
                    console.print(f"[dim]{r.path.name} ({a['backend']}):[/] {n}")
            if r.cached:
                console.print(f"{r.path}: up to date, nothing rebuilt (use --force to rebuild)")
        for f in failures:
            err_console.print(f"[red]failed[/] {f['target']} {f['precision']}: {f['error']}")
    return 2 if failures else 0


def bundles_table(title: str, results: list) -> Any:
    """One row per artifact of each BuildResult: where it is for, its size, parity and whether it was rebuilt."""
    rows = []
    for r in results:
        s = r.summary()
        for a in s["artifacts"]:
            par = a["parity"]
            rows.append([s["model"], s["target"], s["precision"], a["backend"], a["kind"], fmt_bytes(a["size"]),
                         par.get("max_abs"), par.get("cosine"), par.get("dice_agreement"), a["float_layers"],
                         "cached" if s["cached"] else f"built {s['seconds']}s", s["bundle"]])
    return table(title, ["model", "target", "precision", "backend", "artifact", "size", "max abs", "cosine",
                         "mask Dice vs torch", "float layers", "status", "folder"], rows)


def _complete_on_device(args: argparse.Namespace) -> int:
    """A TensorRT bundle built off-device: build its engine here (needs TensorRT and a GPU)."""
    with progress_bar("engine", enabled=not args.json) as bar:
        result = complete_bundle(Path(args.model), force=args.force, progress=bar,
                                 allowed_signers=args.allowed_signers, require_signature=args.require_signature,
                                 sign=args.sign)
    if args.json:
        print_json(result)
    else:
        console.print(result["message"])
    return 0
