"""TensorRT release numbers as the rest of the backend needs them.

Three facts are version-dependent and live here so every module agrees:
which releases sfedge supports (8.5/8.6 on JetPack 5, 10.x on JetPack 6,
11.x on x86/SBSA), the integer TensorRT writes into calibration-cache
headers, and whether a device's installed release matches a target's.

The header integer is ``NV_TENSORRT_VERSION``: ``major*1000 + minor*100 +
patch`` in the 8.x ``NvInferVersion.h`` (8.5.2 -> 8502, seen in caches as
``TRT-8502-EntropyCalibration2``) and ``major*10000 + minor*100 + patch``
from 10.0 on (``NV_TENSORRT_VERSION_INT``; 10.3.0 -> 100300, seen as
``TRT-100300-EntropyCalibration2``).
"""

from __future__ import annotations

import re

from sfedge.errors import ConfigError

__all__ = ["parse_version", "version_code", "version_matches", "is_strongly_typed", "format_version"]

_VERSION = re.compile(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[.\-+~].*)?\s*$")
SUPPORTED_MAJORS = (8, 10, 11)  # TensorRT 9 never shipped for Jetson or as a GA x86 release we target


def parse_version(text: str | tuple[int, ...]) -> tuple[int, int, int]:
    """(major, minor, patch) of "10.3", "8.5.2", "10.3.0.30" or "8.5.2-1+cuda11.4"; refuses unsupported releases."""
    if isinstance(text, tuple):
        parts = (tuple(text) + (0, 0, 0))[:3]
    else:
        m = _VERSION.match(str(text))
        if not m:
            raise ConfigError(f"'{text}' is not a TensorRT version", "give a version such as \"10.3\" or \"8.5.2\"")
        parts = (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))
    major, minor, patch = (int(p) for p in parts)
    if major not in SUPPORTED_MAJORS or (major == 8 and minor < 5):
        raise ConfigError(
            f"TensorRT {format_version((major, minor, patch))} is not supported",
            "sfedge builds for TensorRT 8.5/8.6 (JetPack 5), 10.x (JetPack 6) and 11.x",
        )
    return major, minor, patch


def format_version(version: tuple[int, int, int]) -> str:
    return ".".join(str(p) for p in version)


def version_code(version: str | tuple[int, ...]) -> int:
    """NV_TENSORRT_VERSION of a release: the number in calibration-cache headers (8502, 100300)."""
    major, minor, patch = parse_version(version)
    if major < 10:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def version_matches(wanted: str, installed: str) -> bool:
    """True when ``installed`` is the release ``wanted`` names, comparing only the fields ``wanted`` gives.

    "10.3" matches 10.3.0.30; "8.5.2" matches 8.5.2.2 but not 8.5.3.  Engines
    only load on the TensorRT release that built them, so this is what
    decides whether a machine can build a target's engine.
    """
    m = _VERSION.match(str(wanted))
    if not m:
        return False
    given = [int(g) for g in m.groups() if g is not None]
    try:
        have = parse_version(installed)
    except ConfigError:
        return False
    return list(have[: len(given)]) == given


def is_strongly_typed(version: str | tuple[int, ...], strongly_typed: bool | None = None) -> bool:
    """Whether a build for ``version`` is strongly typed (precision from the ONNX's own types).

    TensorRT 11 is always strongly typed (its precision flags and calibrators
    are gone); 10.x may be either and defaults to weakly typed here (JetPack 6:
    --fp16, --int8); 8.5 has no strongly typed networks at all.
    """
    major, _, _ = parse_version(version)
    if major >= 11:
        if strongly_typed is False:
            raise ConfigError("TensorRT 11 builds are always strongly typed", "drop strongly_typed=False for this target")
        return True
    if major == 8:
        if strongly_typed:
            raise ConfigError("TensorRT 8.5 has no strongly typed networks", "build weakly typed (the default) for JetPack 5")
        return False
    return bool(strongly_typed)
