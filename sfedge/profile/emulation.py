"""Is this process running under an emulator (QEMU user mode), and which CPU features does it see?

Latency measured under emulation says nothing about the device it imitates,
so the profiler records it and every report labels such latencies.  Detection
runs on the device, needs nothing but the standard library, and combines
independent signs (any one is enough):

* ``cpuinfo``: the process is ARM (``platform.machine()``) but the kernel's
  ``/proc/cpuinfo`` describes an x86 CPU (QEMU user mode passes the host's
  file through; a real ARM kernel never lists ``vendor_id`` or SSE flags);
* ``binfmt``: ``binfmt_misc`` routes binaries of this process's own
  architecture to an interpreter (``/proc/sys/fs/binfmt_misc/qemu-<arch>``
  enabled); a native machine never registers its own architecture;
* ``maps``: a QEMU binary is mapped into the process (older QEMU releases
  show it in ``/proc/self/maps``).

The CPU features come from the ELF auxiliary vector (``AT_HWCAP``), which
QEMU fills for the CPU model it emulates (``QEMU_CPU``) and a real kernel for
the real core: ``fp16_arithmetic`` says whether XNNPACK can compute in fp16.
"""

from __future__ import annotations

import os
import platform
import struct
from pathlib import Path
from typing import Any

__all__ = ["emulation_info", "arm_hwcaps", "EMULATED_LABEL", "is_emulated", "latency_caption"]

EMULATED_LABEL = "emulated, not device speed"
AT_HWCAP = 16
# arm64 AT_HWCAP bits (linux/arch/arm64/include/uapi/asm/hwcap.h) sfedge cares about.
ARM64_HWCAPS = {"fp": 0, "asimd": 1, "fphp": 9, "asimdhp": 10, "asimddp": 20, "sve": 22, "asimdfhm": 23, "i8mm": 45}
X86_CPUINFO_KEYS = ("vendor_id", "cpu family")
ARM_MACHINES = ("aarch64", "arm64", "armv7l", "armv8l", "armv7", "arm")


def _read(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def _auxv() -> dict[int, int]:
    """The ELF auxiliary vector of this process (empty when /proc/self/auxv cannot be read)."""
    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return {}
    width = struct.calcsize("P")
    fmt = "QQ" if width == 8 else "II"
    step = 2 * width
    out: dict[int, int] = {}
    for i in range(0, len(raw) - step + 1, step):
        key, value = struct.unpack_from(fmt, raw, i)
        if key == 0:
            break
        out[key] = value
    return out


def arm_hwcaps() -> dict[str, bool]:
    """The arm64 CPU features this process sees (from AT_HWCAP); empty on other architectures."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return {}
    hwcap = _auxv().get(AT_HWCAP)
    if hwcap is None:
        return {}
    return {name: bool(hwcap >> bit & 1) for name, bit in ARM64_HWCAPS.items()}


def emulation_info() -> dict[str, Any]:
    """``{"emulated": bool, "emulation": {...}}`` for the profiler's host facts; why, when emulated.

    ``emulation`` holds the signs found (``detected_by``), the emulator's
    interpreter when binfmt names it, the emulated CPU model when QEMU_CPU
    says it, and for arm64 whether the (emulated) core has fp16 arithmetic.
    """
    machine = platform.machine().lower()
    signs: list[str] = []
    detail: dict[str, Any] = {}
    cpuinfo = _read("/proc/cpuinfo")
    if machine in ARM_MACHINES and any(line.split(":")[0].strip() in X86_CPUINFO_KEYS for line in cpuinfo.splitlines()):
        signs.append("cpuinfo")
        detail["kernel_cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                                     if ln.lower().startswith("model name")), "x86")
    binfmt_arch = {"arm64": "aarch64"}.get(machine, machine)
    entry = _read(f"/proc/sys/fs/binfmt_misc/qemu-{binfmt_arch}")
    if entry.splitlines()[:1] == ["enabled"]:
        signs.append("binfmt")
        detail["interpreter"] = next((ln.split(None, 1)[1] for ln in entry.splitlines()
                                      if ln.startswith("interpreter ")), None)
    maps = _read("/proc/self/maps", limit=1 << 22)
    if any("qemu-" in line for line in maps.splitlines()):
        signs.append("maps")
    info: dict[str, Any] = {"emulated": bool(signs)}
    caps = arm_hwcaps()
    if caps:
        info["cpu_features"] = sorted(k for k, v in caps.items() if v)
        info["fp16_arithmetic"] = caps["fphp"] and caps["asimdhp"]
    if signs:
        detail["detected_by"] = signs
        detail["emulator"] = "qemu-user"
        if os.environ.get("QEMU_CPU"):
            detail["cpu_model"] = os.environ["QEMU_CPU"]
        info["emulation"] = detail
    return info


def is_emulated(host: dict[str, Any]) -> bool:
    """Whether a report's host facts say its latencies were measured under emulation."""
    return bool(host.get("emulated"))


def latency_caption(host: dict[str, Any]) -> str:
    """`` (emulated, not device speed)`` for an emulated host's latency headings, else empty."""
    return f" ({EMULATED_LABEL})" if is_emulated(host) else ""
