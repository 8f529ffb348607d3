"""`sfedge verify`: re-check a bundle's files, signature and parity, on the device, without torch."""

from __future__ import annotations

import argparse

from sfedge.console import console, err_console, escape, print_json, table
from sfedge.errors import MalformedBundleError
from sfedge.parity import parse_tolerance_overrides
from sfedge.verify import VerifyReport, verify_bundle

EPILOG = """examples:
  sfedge verify bundles/unet-sfconv__host-cpu__int8
  sfedge verify . --json                 (inside a bundle copied to the device)
  sfedge verify . --whole-image          also run each artifact tiled over the stored whole held-out image
  sfedge verify . --allowed-signers ~/.config/sfedge/allowed_signers     (require a valid signature)
  sfedge verify . --files-only           (hashes and signature only: e.g. a Jetson bundle before its engine is built)
  sfedge verify . --tolerance dice_agreement=0.97   (accept a looser tolerance than the target's, knowingly)

What PASS means: every file matches the manifest's sha256 and no other file is in
the folder; every runnable artifact meets the tolerance of the target installed
here (sfedge's defaults when it is not), and the manifest asks for no looser one;
at least one artifact was run (unless --files-only); and the signature is valid
when one is required.  Hashes alone prove the files are the ones the manifest
lists (no accidental damage); only a signature by a key you trust proves who
built them.  A signature is required with --allowed-signers, --require-signature,
$SFEDGE_ALLOWED_SIGNERS, or a target with require_signature = true.

Exit status:
  0  PASS
  1  FAIL: a changed, missing or unlisted file, a parity miss, a looser tolerance
     than the target's, nothing checked, or a missing or invalid signature
  2  usage or setup error (bad option, no ssh-keygen, no allowed signers file, ...)
  3  not a readable, well-formed bundle: no manifest, invalid or oversized JSON, a
     manifest that breaks the schema, or a path that leaves the bundle"""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="+", help="bundle folder(s)")
    p.add_argument("--backend", help="check only this backend's artifact")
    p.add_argument("--threads", type=int, help="runtime threads (default: the target's)")
    p.add_argument("--whole-image", action="store_true", help="also check each artifact, tiled as `sfedge predict` runs "
                   "it, on the bundle's whole held-out image against the torch model's tiled output")
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="OpenSSH allowed_signers file; a valid signature by one of its keys is then required")
    p.add_argument("--require-signature", action="store_true",
                   help="fail unsigned bundles (signers from --allowed-signers, $SFEDGE_ALLOWED_SIGNERS or the target)")
    p.add_argument("--files-only", action="store_true",
                   help="check hashes, manifest and signature only; run no artifact")
    p.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the target's tolerance here (repeatable): the one way to accept a bundle "
                        "built with a looser --tolerance")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    reports: list[VerifyReport] = []
    malformed: list[str] = []
    overrides = parse_tolerance_overrides(args.tolerance)
    for b in args.bundle:
        try:
            report = verify_bundle(b, backend=args.backend, threads=args.threads, allowed_signers=args.allowed_signers,
                                   require_signature=args.require_signature, files_only=args.files_only,
                                   tolerance_override=overrides)
        except MalformedBundleError as e:
            if len(args.bundle) == 1:
                raise
            malformed.append(str(e))
            err_console.print(f"sfedge verify: error: {e}", markup=False)
            continue
        if args.whole_image and not args.files_only:
            from sfedge.whole_image import check_whole_image

            report.artifacts += check_whole_image(report.bundle, backend=args.backend, threads=args.threads,
                                                  tolerance=report.tolerance.tolerance if report.tolerance else None)
        reports.append(report)
    code = 3 if malformed else 0 if all(r.passed for r in reports) else 1
    if args.json:
        print_json([r.as_dict() for r in reports] if len(args.bundle) > 1 else reports[0].as_dict())
        return code
    for r in reports:
        _print(r)
    return code


def _print(r: VerifyReport) -> None:
    rows = [[a.backend, a.path, a.precision, a.status, a.parity.get("max_abs"), a.parity.get("cosine"),
             a.parity.get("dice_agreement"), a.reason] for a in r.artifacts]
    console.print(table(f"verify {r.bundle}", ["backend", "artifact", "precision", "status", "max abs", "cosine",
                                               "mask Dice", "note"], rows))
    f = r.files
    for name in f.changed:
        err_console.print(f"[red]changed:[/] {escape(name)} (its sha256 differs from the manifest)")
    for name in f.missing:
        err_console.print(f"[red]missing:[/] {escape(name)}")
    for name in f.extra:
        err_console.print(f"[red]not in the manifest:[/] {escape(name)} (a bundle holds only the files its manifest lists)")
    for name in f.unsafe:
        err_console.print(f"[red]not a regular file:[/] {escape(name)} (symlinks and special files are refused)")
    if f.passed:
        console.print(f"files: all {len(f.ok)} match the manifest, and there are no others")
    s = r.signature
    if s.status == "valid":
        console.print(f"signature: valid, by {escape(str(s.principal))} (covers {s.covers})")
    elif s.status == "invalid" or (s.required and not s.passed):
        err_console.print(f"[red]signature {s.status}:[/] {escape(s.reason)}")
    else:
        console.print(f"signature: {escape(s.reason)}")
    if r.tolerance is not None:
        console.print(f"tolerance: {r.tolerance.tolerance.as_dict()} from {escape(r.tolerance.source)}")
    for p in r.problems:
        err_console.print(f"[red]problem:[/] {escape(p)}")
    console.print("[green]PASS[/]" if r.passed else "[red]FAIL[/]")
