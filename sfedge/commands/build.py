"""`sfedge build`: bundles for one model on one or many targets and precisions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfedge.bundle import is_bundle
from sfedge.commands.model_options import MODEL_HELP, add_model_options, model_options
from sfedge.console import console, err_console, fmt_bytes, print_json, progress_bar, table
from sfedge.device_build import complete_bundle
from sfedge.errors import EXIT_PARTIAL, SfedgeError
from sfedge.parity import parse_tolerance_overrides
from sfedge.progress import scaled
from sfedge.targets import DEFAULT_TARGET, list_targets, load_target

EPILOG = """examples:
  sfedge build .cache/demo/unet-sfconv-*.safetensors --target host-cpu --precision int8
  sfedge build ckpt.safetensors --target jetson-orin-nano --target android-arm64 -o bundles/
  sfedge build ckpt.safetensors --all-targets --precision int8
  sfedge build monai.networks.nets:BasicUNet --config basicunet.json --weights model.pt --task binary
  sfedge build net.py:make_net --config '{"classes": 3}' --weights net.pt --calibration my-scans.toml
  sfedge build model.pt2 --target android-arm64                 (a torch.export program, no code needed)
  sfedge build unet-sfconv --target my-board.toml          (registry name: untrained weights)
  sfedge build bundles/unet__jetson-orin-nano__int8        (on the Jetson: build the engine into the bundle)
  sfedge build ckpt.safetensors --target raspberry-pi-5 --verify-on pi@raspberrypi
                                     (parity on the Pi's own kernels, recorded in the manifest; fails the build if off)

A bundle whose inputs (weights, target, precision, calibration set, toolchain, sfedge's
own code) are unchanged and whose files all still verify is not rebuilt; --force
rebuilds it.  A failed or interrupted build leaves no bundle folder behind, two builds
of one bundle wait for each other, and only a bundle folder is ever replaced.  On a
target with several backends each artifact builds on its own: one that fails is
recorded in the manifest and the others are kept.

Signing: --sign ~/.ssh/id_ed25519 writes manifest.json.sig (an SSH signature of the
manifest, which hashes every file); `sfedge verify --allowed-signers FILE` checks it.
On the device, `sfedge build <bundle>` verifies the bundle first (files, manifest,
and the signature with --allowed-signers or a target that requires one) and refuses
a changed one.

Exit status: 0 every bundle complete; 2 an error (nothing written for that build);
3 a bundle to complete on the device is not a readable, well-formed bundle;
4 partial: a bundle was written without some backend's artifact (see "failures" in its
manifest); --require BACKEND makes such a failure an error instead."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP + "; or a bundle folder to complete on the device")
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
    p.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the target's parity tolerance for this build (repeatable; recorded in "
                        "the manifest): max_abs, relative_max_abs, cosine, dice_agreement, fallback_cosine, psnr")
    p.add_argument("--require", action="append", default=[], metavar="BACKEND",
                   help="fail the build if this backend's artifact fails (repeatable; default: keep the others)")
    p.add_argument("--qat", type=int, default=0, metavar="STEPS",
                   help="int8: quantization-aware fine-tuning for STEPS steps (distillation from the fp32 model on the "
                        "calibration images) before quantizing; 0 (default) calibrates only")
    p.add_argument("--float-io", action="store_true",
                   help="int8 TFLite: float32 input and output (default: full-integer, int8 in and out)")
    p.add_argument("--method", action="append", default=[], choices=("entropy", "percentile", "minmax"),
                   help="int8 calibration method(s) to try, the one with the least float cost wins "
                        "(repeatable; default entropy and percentile)")
    p.add_argument("--layer-costs", metavar="JSON",
                   help="int8: {layer name: ms} measured per layer (a latency table) to price float layers "
                        "in the mixed-precision search (default: MACs)")
    p.add_argument("--dry-run", action="store_true", help="list the (target, precision) builds and stop")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_options(p)
    r = p.add_argument_group("parity on the device (plain ssh/scp, as `sfedge profile --remote`)")
    r.add_argument("--verify-on", action="append", default=[], metavar="USER@HOST",
                   help="before a bundle exists, run `sfedge verify` on this device and record its parity in the "
                        "manifest (parity_on); an artifact outside the tolerance there fails the build (repeatable)")
    r.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="passed to ssh and scp as -o")
    r.add_argument("--ssh-config", help="ssh_config file to use instead of ~/.ssh/config (ssh -F)")
    r.add_argument("--remote-python", default="python3", help="Python on the device that has sfedge (default python3)")
    r.add_argument("--install", action="store_true",
                   help="if sfedge or a runtime is missing on the device, install this sfedge there as a wheel")
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

    verify_on = _verify_on(args)
    overrides = parse_tolerance_overrides(args.tolerance)
    options = model_options(args)
    options["int8"] = int8_options(args)
    with progress_bar("build", total=len(jobs), enabled=not args.json) as bar:
        for i, (t, p) in enumerate(jobs):
            sub = scaled(bar, i / len(jobs), 1 / len(jobs), f"{t.name} {p}")
            try:
                results.append(build_bundle(args.model, t, p, calibration=args.calibration, out_dir=Path(args.out),
                                            force=args.force, progress=sub, verify_on=verify_on,
                                            tolerances=overrides, require=args.require, sign=args.sign, **options))
            except SfedgeError as e:
                if single:
                    raise
                failures.append({"target": t.name, "precision": p, "error": str(e)})
    if args.json:
        print_json({"bundles": [r.summary() for r in results], "failures": failures})
    else:
        console.print(bundles_table("bundles", results))
        for r in results:
            for n in r.bundle.manifest["model"].get("notes", []):
                console.print(f"[dim]{r.path.name}:[/] {n}")
            for a in r.bundle.manifest["artifacts"]:
                for n in a.get("notes", []):
                    console.print(f"[dim]{r.path.name} ({a['backend']}):[/] {n}")
            for f in r.failures:
                err_console.print(f"[yellow]partial[/] {r.path.name}: {f['backend']} not built: {f['error']}")
            if r.cached:
                console.print(f"{r.path}: up to date, nothing rebuilt (use --force to rebuild)")
        for f in failures:
            err_console.print(f"[red]failed[/] {f['target']} {f['precision']}: {f['error']}")
    if failures:
        return 2
    return EXIT_PARTIAL if any(r.partial for r in results) else 0


def int8_options(args: argparse.Namespace) -> Any:
    """The build's :class:`sfedge.backends.int8.Int8Options` from --qat, --float-io, --method and --layer-costs."""
    import json

    from sfedge.backends.int8 import DEFAULT_METHODS, Int8Options
    from sfedge.errors import ConfigError

    costs = None
    if getattr(args, "layer_costs", None):
        try:
            costs = json.loads(Path(args.layer_costs).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--layer-costs {args.layer_costs}: cannot read it as JSON ({e})",
                              'give a JSON object {"layer name": milliseconds}') from e
        if not isinstance(costs, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in costs.values()):
            raise ConfigError(f"--layer-costs {args.layer_costs} is not an object of non-negative numbers",
                              'give a JSON object {"layer name": milliseconds}')
    return Int8Options(qat_steps=getattr(args, "qat", 0) or 0, float_io=bool(getattr(args, "float_io", False)),
                       methods=tuple(dict.fromkeys(getattr(args, "method", None) or DEFAULT_METHODS)),
                       costs=costs)


def bundles_table(title: str, results: list) -> Any:
    """One row per artifact of each BuildResult: where it is for, its size, parity (on the devices too, when
    verified there) and whether it was rebuilt."""
    from sfedge.verify_on import parity_on_text

    on_device = any(a.get("parity_on") for r in results for a in r.summary()["artifacts"])
    rows = []
    for r in results:
        s = r.summary()
        for a in s["artifacts"]:
            par = a["parity"]
            rows.append([s["model"], s["target"], s["precision"], a["backend"], a["kind"], fmt_bytes(a["size"]),
                         par.get("max_abs"), par.get("cosine"), par.get("dice_agreement"),
                         (a.get("shifted_parity") or {}).get("dice_agreement"), a["float_layers"],
                         *([parity_on_text(a)] if on_device else []),
                         "cached" if s["cached"] else f"built {s['seconds']}s", s["bundle"]])
    return table(title, ["model", "target", "precision", "backend", "artifact", "size", "max abs", "cosine",
                         "mask Dice vs torch", "shifted", "float layers", *(["on the device"] if on_device else []), "status",
                         "folder"], rows)


def _verify_on(args: argparse.Namespace) -> Any:
    """The --verify-on hosts and how to reach them, or None."""
    if not args.verify_on:
        return None
    from sfedge.profile.remote import RemoteOptions
    from sfedge.verify_on import VerifyOn, parse_hosts

    return VerifyOn(parse_hosts(args.verify_on), RemoteOptions(
        ssh_options=list(args.ssh_option), ssh_config=args.ssh_config, python=args.remote_python, install=args.install))


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
