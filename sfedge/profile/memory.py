"""Process memory as a profiler sees it: RSS now, sampled peak, and the kernel's lifetime peak.

Two peaks, because each misses something: a sampling thread sees the steady
state (between ``start`` and ``stop``) but can miss a spike shorter than its
interval; the kernel's high-water mark (``VmHWM`` on Linux, ``ru_maxrss``
elsewhere) never misses a spike but covers the whole process life, load
included.  Runs in the profiling worker; needs psutil (part of the
runtime-only install) and the standard library.
"""

from __future__ import annotations

import resource
import sys
import threading
from typing import Any

__all__ = ["rss_bytes", "max_rss_bytes", "RssSampler", "memory_notes"]


def rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> tuple[int, str]:
    """Peak RSS over this process's life, and where the figure comes from.

    On Linux this is ``VmHWM`` from /proc/self/status: ``ru_maxrss`` there
    keeps the *parent's* peak across fork+exec (the kernel carries it over in
    the signal struct), so a worker started from a 1 GB process would report
    1 GB.  Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "ru_maxrss"


class RssSampler:
    """Background thread that samples RSS every ``interval`` seconds and keeps the peak.

    A tick is one /proc read, but waking a thread on a device whose cores the
    runtime keeps busy (ONNX Runtime's spinning thread pool) preempts an
    inference thread: at 50 Hz that cost ONNX Runtime about 2% here, at the
    default 10 Hz about 0.2%.  Every configuration runs the same sampler, so
    paired ratios are not biased by it; spikes between ticks are still caught
    by the kernel's high-water mark.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak = 0
        self.samples = 0

    def _loop(self) -> None:
        memory_info = self._process.memory_info
        while not self._stop.wait(self.interval):
            rss = memory_info().rss
            self.samples += 1
            if rss > self.peak:
                self.peak = rss

    def start(self) -> RssSampler:
        """Start sampling (idempotent); the current RSS counts as the first sample."""
        if self._thread is None:
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="sfedge-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; returns the peak RSS seen (bytes)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, self._process.memory_info().rss)
        return self.peak


def memory_notes(backend: str, memory_info: dict[str, Any]) -> list[str]:
    """What the memory figures do and do not count for ``backend`` (shown under the report's table)."""
    notes = []
    if isinstance(memory_info.get("note"), str):  # the runtime's own account (TensorRT on Jetson) comes first
        notes.append(memory_info["note"])
    elif backend == "tensorrt" or any(k.startswith(("device", "engine", "activation")) for k in memory_info):
        notes.append(
            "RSS counts the process's CPU-side pages only; TensorRT engine and activation memory are device "
            "allocations reported by the runtime (engine/activation columns). On a Jetson CPU and GPU share one "
            "DRAM and CUDA allocations (nvmap) do not appear in RSS, so the total DRAM footprint is about "
            "RSS + engine + activation memory; CUDA context overhead (~100-300 MiB) is in neither figure "
            "(see tegrastats for system totals)."
        )
    if backend == "onnxruntime":
        notes.append("ONNX Runtime exposes no arena statistics: its arena is inside RSS after the first inference.")
    if backend == "tflite":
        notes.append("TFLite's tensor arena and XNNPACK's packed weights are inside RSS after the first inference.")
    return notes
