"""`sfedge verify`: re-check a bundle's files and parity, on the device, without torch."""

from __future__ import annotations

import argparse

from sfedge.console import console, err_console, print_json, table
from sfedge.verify import verify_bundle

EPILOG = """examples:
  sfedge verify bundles/unet-sfconv__host-cpu__int8
  sfedge verify . --json                 (inside a bundle copied to the device)
  sfedge verify . --whole-image          also run each artifact tiled over the stored whole held-out image

Exit status: 0 when every file matches the manifest and every runnable artifact meets
the target's tolerance; 1 otherwise (changed or missing files are named)."""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="+", help="bundle folder(s)")
    p.add_argument("--backend", help="check only this backend's artifact")
    p.add_argument("--threads", type=int, help="runtime threads (default: the target's)")
    p.add_argument("--whole-image", action="store_true", help="also check each artifact, tiled as `sfedge predict` runs "
                   "it, on the bundle's whole held-out image against the torch model's tiled output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    reports = [verify_bundle(b, backend=args.backend, threads=args.threads) for b in args.bundle]
    if args.whole_image:
        from sfedge.whole_image import check_whole_image

        for r in reports:
            r.artifacts += check_whole_image(r.bundle, backend=args.backend, threads=args.threads)
    if args.json:
        print_json([r.as_dict() for r in reports] if len(reports) > 1 else reports[0].as_dict())
        return 0 if all(r.passed for r in reports) else 1
    for r in reports:
        rows = [[a.backend, a.path, a.precision, a.status, a.parity.get("max_abs"), a.parity.get("cosine"),
                 a.parity.get("dice_agreement"), a.reason] for a in r.artifacts]
        console.print(table(f"verify {r.bundle}", ["backend", "artifact", "precision", "status", "max abs", "cosine",
                                                   "mask Dice", "note"], rows))
        f = r.files
        if f.changed or f.missing:
            for name in f.changed:
                err_console.print(f"[red]changed:[/] {name} (its sha256 differs from the manifest)")
            for name in f.missing:
                err_console.print(f"[red]missing:[/] {name}")
        else:
            console.print(f"files: all {len(f.ok)} match the manifest" + (f"; {len(f.extra)} extra file(s) ignored" if f.extra else ""))
        console.print("[green]PASS[/]" if r.passed else "[red]FAIL[/]")
    return 0 if all(r.passed for r in reports) else 1
