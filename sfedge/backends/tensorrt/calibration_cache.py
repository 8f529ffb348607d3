"""TensorRT's INT8 calibration cache, written from ranges sfedge computes on the CPU.

TensorRT <= 10 can build an implicitly quantized INT8 engine from an FP32
ONNX plus a calibration cache (``trtexec --int8 --calib=FILE`` or an
``IInt8Calibrator`` whose ``read_calibration_cache`` returns the file).  The
cache is text, the format TensorRT itself writes:

    TRT-100300-EntropyCalibration2
    input: 3c010204
    /inc/inc.0/Conv_output_0: 3d8f5c29

The header is ``TRT-<NV_TENSORRT_VERSION>-<algorithm>``; TensorRT skips a
cache whose header does not match its own release and calibrator (so the
version must be the device's, and trtexec's calibrator is EntropyCalibration2).
Each line is ``<tensor name>: <hex>``, the hex being the big-endian IEEE-754
bits of the per-tensor scale ``amax / 127`` (``3c010204`` is 1/127, amax 1.0).
onnxruntime's ``write_calibration_table`` writes a different format.

TensorRT 11 removed implicit INT8 and calibrators: there, INT8 needs Q/DQ.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

from sfedge.backends.tensorrt.version import parse_version, version_code
from sfedge.errors import CalibrationError, ConfigError
from sfedge.fileio import write_text

__all__ = [
    "write_calibration_cache", "read_calibration_cache", "parse_calibration_cache", "calibration_cache_text",
    "calibration_cache_header", "retarget_calibration_cache", "ALGORITHMS",
]

# Header names of TensorRT's calibrators (IInt8EntropyCalibrator2, IInt8EntropyCalibrator, IInt8MinMaxCalibrator,
# IInt8LegacyCalibrator).
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_QMAX = 127.0
# A tensor that is all zeros on the calibration set has amax 0; TensorRT needs a positive range, and any tiny scale
# represents zero exactly.
_MIN_AMAX = 1e-12


def calibration_cache_header(tensorrt_version: str, algorithm: str = "EntropyCalibration2") -> str:
    """``TRT-<NV_TENSORRT_VERSION>-<algorithm>`` for a TensorRT release (<= 10)."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown calibration algorithm '{algorithm}'", f"use one of {', '.join(ALGORITHMS)}")
    if parse_version(tensorrt_version)[0] >= 11:
        raise ConfigError(
            f"TensorRT {tensorrt_version} has no calibration caches (implicit INT8 was removed in 11)",
            "build INT8 from a Q/DQ ONNX for this target",
        )
    return f"TRT-{version_code(tensorrt_version)}-{algorithm}"


def _scale_hex(amax: float, name: str) -> str:
    if not math.isfinite(amax) or amax < 0:
        raise CalibrationError(f"tensor '{name}' has range {amax!r}", "recompute the calibration ranges")
    scale = max(float(amax), _MIN_AMAX) / _QMAX
    return struct.pack(">f", scale).hex()


def calibration_cache_text(
    ranges: dict[str, float], *, tensorrt_version: str, algorithm: str = "EntropyCalibration2"
) -> str:
    """The cache file's text for symmetric ranges ``ranges`` (tensor name -> amax)."""
    if not ranges:
        raise CalibrationError("no tensor ranges to write", "compute ranges on a calibration set first")
    lines = [calibration_cache_header(tensorrt_version, algorithm)]
    for name, amax in ranges.items():
        if not name or "\n" in name:
            raise CalibrationError(f"tensor name {name!r} cannot be written to a calibration cache")
        lines.append(f"{name}: {_scale_hex(amax, name)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(
    ranges: dict[str, float],
    path: str | os.PathLike[str],
    *,
    tensorrt_version: str,
    algorithm: str = "EntropyCalibration2",
) -> Path:
    """Write ``ranges`` (tensor name -> symmetric amax) as TensorRT's calibration cache for ``tensorrt_version``.

    Why: the device can then build implicit-INT8 engines without calibration
    images, from ranges computed (and checked) on the workstation.
    """
    return write_text(path, calibration_cache_text(ranges, tensorrt_version=tensorrt_version, algorithm=algorithm))


def parse_calibration_cache(text: str) -> tuple[str, dict[str, float]]:
    """(header, tensor name -> amax) of a cache's text; amax = scale * 127."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not _HEADER.match(lines[0].strip()):
        raise CalibrationError(
            "not a TensorRT calibration cache (the first line should look like TRT-100300-EntropyCalibration2)",
            "write it with write_calibration_cache",
        )
    ranges: dict[str, float] = {}
    for ln in lines[1:]:
        name, sep, hexbits = ln.rpartition(":")
        hexbits = hexbits.strip()
        if not sep or not name or not re.fullmatch(r"[0-9a-fA-F]{1,8}", hexbits):
            raise CalibrationError(f"bad calibration cache line {ln!r}", "expected '<tensor name>: <8 hex digits>'")
        scale = struct.unpack(">f", int(hexbits, 16).to_bytes(4, "big"))[0]
        ranges[name] = scale * _QMAX
    return lines[0].strip(), ranges


def read_calibration_cache(path: str | os.PathLike[str]) -> tuple[str, dict[str, float]]:
    """(header, tensor name -> amax) of a TensorRT calibration cache file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration cache {path}: {e}") from e
    return parse_calibration_cache(text)


def retarget_calibration_cache(data: bytes, tensorrt_version: str) -> bytes:
    """The same cache with its header's version set to ``tensorrt_version`` (scales untouched).

    TensorRT ignores a cache whose header names another release; the scales
    are ours, not a TensorRT artefact, so the device's build may relabel them
    for the release it actually runs.
    """
    text = data.decode()
    header, _, rest = text.partition("\n")
    m = _HEADER.match(header.strip())
    if not m:
        raise CalibrationError("not a TensorRT calibration cache", "write it with write_calibration_cache")
    return (calibration_cache_header(tensorrt_version, m.group(2)) + "\n" + rest).encode()
