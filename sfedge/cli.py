"""The `sfedge` command line: one verb per job.

Every verb lives in ``sfedge/commands/<verb>.py`` with ``register(subparsers)``
and a ``run(args) -> int``; this module only wires them up and turns errors
into one line on stderr and a non-zero exit (a traceback only with
``--verbose``).  Importing it is cheap: verbs import torch and the converters
only when they run, so the runtime-only install on a device can use
``verify``, ``profile`` and ``inspect``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
import warnings

from sfedge import __version__
from sfedge.errors import SfedgeError
from sfedge.progress import clear_interrupt, note_interrupt

__all__ = ["main", "build_parser", "VERBS"]

# (verb, module, one-line help) in the order `sfedge --help` lists them.
VERBS = (
    ("build", "sfedge.commands.build", "build per-device bundles (artifacts + manifest) for a model and target(s)"),
    ("verify", "sfedge.commands.verify", "re-check a bundle's hashes and parity (runs on the device, no torch)"),
    ("predict", "sfedge.commands.predict", "masks and logits for whole images through a bundle, tiled (no torch)"),
    ("profile", "sfedge.commands.profile", "measure latency and memory of bundles; SFConv vs vanilla paired"),
    ("compare", "sfedge.commands.compare", "merge profile reports from several devices into one table and figure"),
    ("sweep", "sfedge.commands.sweep", "factorize at several ranks, build, check, profile; Pareto front"),
    ("plan", "sfedge.commands.plan", "per-layer ranks from latencies measured on the target, under a budget"),
    ("targets", "sfedge.commands.targets", "list the known targets and their device facts"),
    ("doctor", "sfedge.commands.doctor", "first thing on a new device: GPU, TensorRT, a test engine, matching targets"),
    ("inspect", "sfedge.commands.inspect", "describe a model, checkpoint, .onnx, .tflite or bundle"),
    ("factorize", "sfedge.commands.factorize", "turn a checkpoint's convs into SFConv layers at a given s"),
    ("train", "sfedge.commands.train", "train a model on the fundus demo data (pseudo-labels)"),
    ("calibration", "sfedge.commands.calibration", "list calibration sets or show what one resolves to"),
    ("demo", "sfedge.commands.demo", "the demo: train, build host-cpu and device bundles, profile"),
)

EPILOG = """examples:
  sfedge demo                                   train the demo pair, build and profile on this CPU
  sfedge build unet-sfconv --target host-cpu --precision int8
  sfedge build ckpt.safetensors --target jetson-orin-nano --target android-arm64 -o bundles/
  sfedge verify bundles/unet-sfconv__host-cpu__int8
  sfedge profile bundles/unet-sfconv__host-cpu__fp32 --pair bundles/unet__host-cpu__fp32

run `sfedge VERB --help` for a verb's options and examples."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The full parser (every verb's module is imported, which is cheap by design)."""
    parser = argparse.ArgumentParser(
        prog="sfedge",
        description="Turn SFConv and vanilla medical-imaging CNNs into per-device artifacts, and profile them.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"sfedge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, module, help_text in VERBS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # a verb whose module is not written yet
                continue
            raise
        p = mod.register(sub, verb, help_text)
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug output")
    return parser


def one_line(text: str) -> str:
    """``text`` with control characters escaped: an error names paths and names from untrusted bundles, and a
    newline in one must not split the one-line error (or forge a second line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_TERMINATED: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (kill, systemd, a CI timeout) unwinds like Ctrl-C, so half-written .part folders are removed."""
    _TERMINATED.append(signum)
    note_interrupt(signum)
    raise KeyboardInterrupt


def _interrupted_exit_code() -> int:
    return 128 + signal.SIGTERM if _TERMINATED else 130


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: KeyboardInterrupt now, and again at the next progress report if a library swallowed this one."""
    note_interrupt(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the verb, map errors to one line and an exit code.

    An interrupt exits 130 (143 for SIGTERM) whenever it lands, even inside
    the handling of an earlier one: a KeyboardInterrupt escaping ``main``
    would make Python kill itself with SIGINT instead (exit -2 on a CI run,
    when a swallowed Ctrl-C was raised a second time).
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        clear_interrupt()
        return _interrupted_exit_code()


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGINT, _interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verbose", False):
        # torch, litert-torch and jax warn about their own deprecations on every conversion; not the user's concern.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|litert_torch|jax|ai_edge_quantizer)\b.*")
    else:
        os.environ["SFEDGE_VERBOSE"] = "1"
    try:
        return int(args.func(args) or 0)
    except SfedgeError as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"sfedge {args.verb}: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():  # a late second signal must not kill the exit code
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        clear_interrupt()  # handled: no later report may raise it again
        how = "terminated" if _TERMINATED else "interrupted"
        print(f"sfedge {args.verb}: {how}; nothing half-written was left behind", file=sys.stderr)
        return _interrupted_exit_code()
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
