"""Is there a CUDA GPU with TensorRT here?  Asked in a subprocess, because asking can crash.

Creating TensorRT objects on a machine without a usable GPU logs CUDA error
35 and then segfaults the whole process (seen with tensorrt-lean on a
GPU-less x86 host).  So the question is asked by a short child Python process:
it reads the Jetson facts (/proc/device-tree/model, /etc/nv_tegra_release),
queries the CUDA driver API through ctypes (libcuda: device name, compute
capability, memory), and only when a device exists imports tensorrt and
creates a Builder.  A crash, a hang or an error in the child just means
"no": this process never touches TensorRT before the child said yes.
The child starts isolated (:mod:`sfedge.isolation`): the folder the user runs
``sfedge build`` from (a TensorRT device folder, say) is never on its
``sys.path``, so a planted ``ctypes.py`` or ``json.py`` there cannot run.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from sfedge.backends.tensorrt.version import version_matches
from sfedge.isolation import neutral_cwd, python_argv

__all__ = ["GpuInfo", "DeviceReport", "detect_gpu", "probe_device", "PROBE"]

# Runs in the child.  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR are 75/76 in cuda.h.
PROBE = r"""
import ctypes, json
out = {"jetson_model": None, "l4t": None, "gpu": None, "tensorrt": None, "tensorrt_error": None}
try:
    with open("/proc/device-tree/model", "rb") as f:
        out["jetson_model"] = f.read().rstrip(b"\x00").decode(errors="replace").strip() or None
except OSError:
    pass
try:
    with open("/etc/nv_tegra_release") as f:
        out["l4t"] = f.readline().strip() or None
except OSError:
    pass
cuda = None
for lib in ("libcuda.so.1", "libcuda.so"):
    try:
        cuda = ctypes.CDLL(lib)
        break
    except OSError:
        pass
if cuda is not None and cuda.cuInit(0) == 0:
    n = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0:
        dev = ctypes.c_int(0)
        cuda.cuDeviceGet(ctypes.byref(dev), 0)
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        major, minor, driver = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
        cuda.cuDriverGetVersion(ctypes.byref(driver))
        total = ctypes.c_size_t(0)
        cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
        out["gpu"] = {"name": name.value.decode(errors="replace"), "sm": major.value * 10 + minor.value,
                      "memory_bytes": total.value, "cuda_driver": driver.value, "count": n.value}
        ctx, free, total2 = ctypes.c_void_p(), ctypes.c_size_t(0), ctypes.c_size_t(0)
        if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0:
            if cuda.cuCtxSetCurrent(ctx) == 0 and cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total2)) == 0:
                out["gpu"]["free_memory_bytes"] = free.value
            cuda.cuDevicePrimaryCtxRelease(dev)
try:  # importing is safe without a GPU; creating TensorRT objects is not
    import tensorrt as trt
    out["tensorrt"] = str(trt.__version__)
except Exception as e:
    out["tensorrt_error"] = f"{type(e).__name__}: {e}"
if out["gpu"] is not None and out["tensorrt"] is not None:
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            out["tensorrt_error"] = "trt.Builder() returned None"
        else:
            out["gpu"]["dla_cores"] = int(builder.num_DLA_cores)
    except Exception as e:
        out["tensorrt_error"] = f"{type(e).__name__}: {e}"
print("SFEDGE-GPU-PROBE " + json.dumps(out))
"""
_MARK = "SFEDGE-GPU-PROBE "


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device this machine has, and the TensorRT that can use it (None when missing or broken)."""

    name: str
    sm: int  # compute capability as an integer: 87 for Orin, 72 for Xavier
    memory_bytes: int
    cuda_driver: int
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    jetson_model: str | None = None
    l4t: str | None = None
    dla_cores: int | None = None  # None: TensorRT could not be asked
    free_memory_bytes: int | None = None  # cuMemGetInfo; on a Jetson, what the shared RAM has free

    @property
    def is_jetson(self) -> bool:
        """Jetsons (and other Tegra boards) share one LPDDR memory between CPU and GPU."""
        return self.l4t is not None or "jetson" in (self.jetson_model or "").lower()

    def mismatch(self, tensorrt_version: str, sm: int) -> str | None:
        """Why this machine cannot build engines for (``tensorrt_version``, ``sm``), or None when it can."""
        if self.tensorrt is None:
            why = f" ({self.tensorrt_error})" if self.tensorrt_error else ""
            return f"no working TensorRT Python bindings next to the {self.name}{why}"
        if self.tensorrt_error:
            return f"TensorRT {self.tensorrt} does not work here: {self.tensorrt_error}"
        if not version_matches(tensorrt_version, self.tensorrt):
            return f"this machine has TensorRT {self.tensorrt}, the target needs {tensorrt_version}"
        if int(sm) != self.sm:
            return f"this GPU ({self.name}) is sm_{self.sm}, the target is sm_{sm}"
        return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_probe(code: str, timeout: float) -> dict[str, Any] | None:
    """Run ``code`` in a fresh interpreter; its report dict, or None if it crashed, hung or printed none."""
    try:
        proc = subprocess.run(python_argv("-c", code), capture_output=True, text=True, timeout=timeout,
                              cwd=neutral_cwd())
    except (subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode != 0:  # includes -SIGSEGV from a TensorRT that cannot find a GPU
        return None
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            try:
                report: dict[str, Any] = json.loads(line[len(_MARK):])
            except json.JSONDecodeError:
                return None
            return report
    return None


@dataclass(frozen=True)
class DeviceReport:
    """Everything the probe saw, GPU or not: what `sfedge doctor` reports when there is nothing to build on."""

    gpu: GpuInfo | None
    tensorrt: str | None  # the version of the `tensorrt` module the probe imported
    tensorrt_error: str | None  # why importing it (or creating a Builder) failed
    jetson_model: str | None = None
    l4t: str | None = None
    probe_failed: bool = False  # the child crashed, hung or printed no report

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_device(timeout: float = 60.0) -> DeviceReport:
    """What this machine has: Jetson facts, the CUDA GPU (None when none) and TensorRT, asked in a subprocess.

    Why a subprocess: see the module docstring.  The timeout covers a first
    CUDA initialisation on a Jetson, which can take several seconds.
    """
    report = _run_probe(PROBE, timeout)
    if not report:
        return DeviceReport(None, None, None, probe_failed=True)
    tensorrt, error = report.get("tensorrt"), report.get("tensorrt_error")
    jetson, l4t = report.get("jetson_model"), report.get("l4t")
    gpu = report.get("gpu")
    info = None
    if gpu:
        info = GpuInfo(
            name=str(gpu["name"]), sm=int(gpu["sm"]), memory_bytes=int(gpu["memory_bytes"]),
            cuda_driver=int(gpu["cuda_driver"]), tensorrt=tensorrt, tensorrt_error=error, jetson_model=jetson, l4t=l4t,
            dla_cores=gpu.get("dla_cores"), free_memory_bytes=gpu.get("free_memory_bytes"),
        )
    return DeviceReport(info, tensorrt, error, jetson, l4t)


def detect_gpu(timeout: float = 60.0) -> GpuInfo | None:
    """The CUDA GPU of this machine with its TensorRT version, or None when there is no usable GPU."""
    return probe_device(timeout).gpu
