"""The exact ``trtexec`` command that builds a target's engine, per TensorRT release.

The flags differ by release, and a wrong one makes trtexec exit with an error
on the device.  What each release takes (trtexec --help of 8.5.3, the
"Migrating trtexec Usage" pages for 8.x -> 10.x and 10.x -> 11.x):

================  =============================  ===============================  ==========================
                  8.5 (JetPack 5)                10.x (JetPack 6)                 11.x
================  =============================  ===============================  ==========================
workspace         --memPoolSize=workspace:N      --memPoolSize=workspace:NM       same as 10
                  (MiB, no suffix; --workspace   (--workspace removed in 10)
                  deprecated)
build only        --buildOnly                    --skipInference                  --skipInference
fp32              --noTF32                       --noTF32                         --noTF32
fp16              --fp16                         --fp16, or --stronglyTyped on    nothing: strongly typed
                                                 an fp16 ONNX                     always, precision flags
                                                                                  removed; fp16 ONNX
int8, Q/DQ        --int8                         --int8, or --stronglyTyped       nothing (Q/DQ ONNX)
int8, implicit    --int8 --calib=FILE            --int8 --calib=FILE (deprecated) removed: use Q/DQ
timing cache      --timingCacheFile=FILE         --timingCacheFile=FILE           --timingCacheFile=FILE
================  =============================  ===============================  ==========================

``--skipInference`` arrived in 8.6 (8.5's help lists only ``--buildOnly``).
FP32 builds turn TF32 off (``--noTF32``): TensorRT enables TF32 by default on
Ampere (Orin), which would cost the fp32 artifact its parity with torch.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from sfedge.backends.tensorrt.version import format_version, is_strongly_typed, parse_version, version_code
from sfedge.errors import ConfigError
from sfedge.fileio import write_text

__all__ = ["trtexec_command", "write_build_script", "DEFAULT_WORKSPACE_MB", "PRECISIONS"]

DEFAULT_WORKSPACE_MB = 1024
PRECISIONS = ("fp32", "fp16", "int8")


def _shape_spec(shapes: dict[str, Sequence[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in dims)}" for name, dims in shapes.items())


def trtexec_command(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    tensorrt_version: str,
    precision: str,
    qdq: bool = False,
    calibration_cache: str | os.PathLike[str] | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    strongly_typed: bool | None = None,
    shapes: dict[str, Sequence[int]] | None = None,
    trtexec: str = "trtexec",
) -> list[str]:
    """argv of the trtexec call that builds ``engine_path`` from ``onnx_path`` on ``tensorrt_version``.

    Why: the device may have no Python TensorRT bindings (or no sfedge), but
    every JetPack ships trtexec; this command is the build that needs nothing
    else.  ``qdq`` says the ONNX carries Q/DQ nodes (explicit INT8);
    ``calibration_cache`` builds implicit INT8 from an FP32 ONNX instead.
    ``shapes`` (input name -> dims) is only for ONNX files with dynamic axes.
    """
    version = parse_version(tensorrt_version)
    major = version[0]
    typed = is_strongly_typed(version, strongly_typed)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not qdq and calibration_cache is None:
        raise ConfigError("an int8 build needs a Q/DQ ONNX or a calibration cache", "pass qdq=True or calibration_cache")
    if calibration_cache is not None and (precision != "int8" or qdq):
        raise ConfigError("a calibration cache only applies to implicit int8 builds of an FP32 ONNX",
                          "drop calibration_cache, or build int8 with qdq=False")
    if calibration_cache is not None and typed:
        raise ConfigError(
            f"TensorRT {format_version(version)} strongly typed builds have no implicit INT8 (calibration caches)",
            "build INT8 from a Q/DQ ONNX",
        )
    if workspace_mb <= 0:
        raise ConfigError(f"bad workspace size {workspace_mb} MiB", "give a positive size in MiB")

    cmd = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if precision == "fp32":
        cmd.append("--noTF32")
    elif typed:
        if major < 11:  # 11 is strongly typed by default and has no use for the flag
            cmd.append("--stronglyTyped")
    elif precision == "fp16":
        cmd.append("--fp16")
    else:
        cmd.append("--int8")
        if calibration_cache is not None:
            cmd.append(f"--calib={calibration_cache}")
    cmd.append(f"--memPoolSize=workspace:{int(workspace_mb)}" + ("" if major == 8 else "M"))
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if shapes:
        spec = _shape_spec(shapes)
        cmd += [f"--minShapes={spec}", f"--optShapes={spec}", f"--maxShapes={spec}"]
    cmd.append("--buildOnly" if version[:2] <= (8, 5) else "--skipInference")
    return cmd


def _comment(text: str) -> str:
    """``text`` as one shell comment line: control characters (a newline would start a command) become spaces."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in str(text))


def _shell_line(cmd: Sequence[str]) -> str:
    """``cmd`` as one shell line, with argv[0] replaced by "$TRTEXEC" (found at run time)."""
    return " \\\n  ".join(['"$TRTEXEC"'] + [shlex.quote(str(a)) for a in cmd[1:]])


def write_build_script(
    path: str | os.PathLike[str],
    command: Sequence[str],
    *,
    tensorrt_version: str,
    title: str,
    alternatives: Sequence[tuple[str, Sequence[str]]] = (),
) -> Path:
    """Write an executable sh script that runs ``command`` from the script's own folder.

    trtexec is taken from $TRTEXEC, else PATH, else JetPack's
    /usr/src/tensorrt/bin/trtexec (JetPack does not put it on PATH).  The
    script reads the release from trtexec's banner ("&&&& RUNNING
    TensorRT.trtexec [TensorRT v100300]") and says so when it is not the
    target's: the engine is then built for the release found.
    ``alternatives`` are (explanation, command) pairs written as comments; one
    that reads a calibration cache comes with the sed line that relabels the
    cache for the release found (trtexec ignores a cache from another release
    and then calibrates on random data).  Arguments are ``shlex.quote``-d, and
    text in comments (titles name the model) loses its control characters, so
    nothing embedded can start a shell line.
    """
    v = format_version(parse_version(tensorrt_version))
    code = version_code(tensorrt_version)
    lines = [
        "#!/bin/sh",
        f"# {_comment(title)}",
        f"# For TensorRT {v}: an engine only loads on the TensorRT release and GPU that built it.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if [ ! -x "$TRTEXEC" ]; then',
        '  echo "trtexec not found: install TensorRT (JetPack) or set TRTEXEC=/path/to/trtexec" >&2',
        "  exit 2",
        "fi",
        'FOUND=$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p\' | head -n 1)',
        f'if [ -n "$FOUND" ] && [ "$FOUND" != "{code}" ]; then',
        f'  echo "note: trtexec here is TensorRT v$FOUND, the target names v{code} (TensorRT {v}); '
        'the engine is built for the release found here" >&2',
        "fi",
        _shell_line(command),
    ]
    for note, alt in alternatives:
        lines += ["", f"# {_comment(note)}"]
        if any(str(a).startswith("--calib=") for a in alt):
            cache = next(str(a) for a in alt if str(a).startswith("--calib="))[len("--calib="):]
            lines.append(_comment(f'# sed -i "1s/^TRT-[0-9]*-/TRT-$FOUND-/" {shlex.quote(cache)}   '
                                  "# relabel the cache for the release found"))
        lines += ["# " + ln for ln in _shell_line(alt).splitlines()]
    out = write_text(path, "\n".join(lines) + "\n")
    out.chmod(0o755)
    return out
