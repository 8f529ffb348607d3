"""The profiling worker: one process per measured configuration (and replica), driven over JSON lines.

``python -m sfedge.profile.worker`` reads one JSON request per line on stdin
and answers with one JSON line.  Each worker loads its runner once, so its
memory figures are its own (a second model in the same process would share
the allocator, the runtime's arenas and the kernel's peak-RSS mark), and the parent can
alternate timing between two workers (SFConv, vanilla, SFConv, ...) without
reloading anything.

Timing happens here, with ``time.perf_counter_ns`` around ``runner.infer``
only (its clock is system-wide on Linux and macOS, so the parent can line up
two workers' start times): no IPC, JSON or input conversion inside the timed region.  The garbage
collector is paused while a block runs (after a collection) so a collection
triggered by the runtime's output arrays does not land in one configuration's
samples.  Anything the runtime prints goes to stderr, never into the protocol.

Requests (``cmd``): ``load`` (path, backend, threads, options, input, runner),
``warmup`` (runs, seconds), ``run`` (count), ``memory``, ``layers`` (count:
that many more runs, then the runtime profiler's per-node times of those
runs), ``exit``.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.backends.registry import runner_for
from sfedge.profile.memory import RssSampler, max_rss_bytes, rss_bytes

__all__ = ["Worker", "main", "load_runner_class"]


def load_runner_class(spec: str) -> type:
    """A Runner class from ``"package.module:Class"`` or ``"/path/to/file.py:Class"``.

    Lets a user profile a runtime sfedge has no backend for with the same
    measurement code (and the tests use it for workloads of known cost).
    """
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"runner spec {spec!r} must look like 'package.module:Class' or 'file.py:Class'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        loader_spec = importlib.util.spec_from_file_location(f"sfedge_user_runner_{path.stem}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


class Worker:
    """The state of one worker process: its runner, its feed and its memory sampler."""

    def __init__(self) -> None:
        self.runner: Any = None
        self.feed: dict[str, np.ndarray] = {}
        self.sampler: RssSampler | None = None

    # -- commands ---------------------------------------------------------------
    def load(self, path: str, backend: str | None = None, threads: int | None = None, options: dict | None = None,
             input: str | None = None, runner: str | None = None, sample_interval: float = 0.1) -> dict[str, Any]:
        """Create the runner, load it, build the feed and time the first inference; start the RSS sampler."""
        rss_start = rss_bytes()
        start = time.perf_counter_ns()
        if runner:
            self.runner = load_runner_class(runner)(path, threads=threads, **(options or {}))
        else:
            self.runner = runner_for(path, backend=backend, threads=threads, **(options or {}))
        versions = self.runner.versions()  # imports the runtime, so load_ms is session creation alone
        import_ns = time.perf_counter_ns() - start
        rss_before = rss_bytes()
        start = time.perf_counter_ns()
        self.runner.load()
        load_ns = time.perf_counter_ns() - start
        rss_loaded = rss_bytes()
        versions.update(self.runner.versions())  # some runners know more once loaded (TensorRT, CUDA)
        self.feed, feed_source = self._make_feed(input)
        start = time.perf_counter_ns()
        self.runner.infer(self.feed)
        first_ns = time.perf_counter_ns() - start
        rss_first = rss_bytes()
        self.sampler = RssSampler(sample_interval).start()
        return {
            "import_ms": import_ns / 1e6, "load_ms": load_ns / 1e6, "first_ms": first_ns / 1e6,
            "rss_start": rss_start, "rss_before_load": rss_before, "rss_after_load": rss_loaded,
            "rss_after_first": rss_first, "versions": versions, "feed": feed_source,
            "inputs": [t.as_dict() for t in self.runner.inputs], "outputs": [t.as_dict() for t in self.runner.outputs],
            "pid": os.getpid(),
        }

    def _make_feed(self, input_path: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The bundle's first held-out input in the artifact's layout/dtype, else a seeded random feed."""
        if input_path:
            try:
                x = np.load(input_path)
                batch = self.runner.inputs[0].shape[0] if self.runner.inputs[0].shape else 1
                feed = self.runner.prepare(x[:batch])
                if all(tuple(feed[t.name].shape) == tuple(t.shape) for t in self.runner.inputs):
                    return feed, "bundle held-out input"
            except (OSError, ValueError, KeyError, IndexError):
                pass
        return self.runner.random_feed(), "random"

    def warmup(self, runs: int = 1, seconds: float = 0.5) -> dict[str, Any]:
        """Run until at least ``runs`` inferences have taken at least ``seconds`` in total; returns their times."""
        samples: list[int] = []
        total, budget = 0, int(seconds * 1e9)
        while len(samples) < runs or total < budget:
            durations, _ = self._timed(1, collect=False)
            samples += durations
            total += durations[0]
        return {"samples_ns": samples}

    def run(self, count: int, rewarm: int = 0) -> dict[str, Any]:
        """Time ``count`` inferences back to back after ``rewarm`` untimed ones; also when each started.

        ``rewarm``: a worker resumed after another one ran finds its caches
        and thread pool cold; the parent asks for one untimed inference per
        block so the samples are steady-state, back-to-back inferences.
        Start times are perf_counter_ns, for checking the alternation.
        """
        for _ in range(int(rewarm)):
            self.runner.infer(self.feed)
        durations, starts = self._timed(int(count))
        return {"samples_ns": durations, "starts_ns": starts}

    def _timed(self, count: int, collect: bool = True) -> tuple[list[int], list[int]]:
        infer, feed, clock = self.runner.infer, self.feed, time.perf_counter_ns
        durations, starts = [0] * count, [0] * count
        if collect:
            gc.collect()
        gc.disable()
        try:
            for i in range(count):
                t0 = clock()
                infer(feed)
                durations[i] = clock() - t0
                starts[i] = t0
        finally:
            gc.enable()
        return durations, starts

    def memory(self) -> dict[str, Any]:
        """RSS now, the sampled steady-state peak, the lifetime peak, and what the runtime reports."""
        peak = self.sampler.stop() if self.sampler else rss_bytes()
        lifetime, source = max_rss_bytes()
        result: dict[str, Any] = {
            "rss_now": rss_bytes(), "peak_rss_steady": peak, "peak_rss_lifetime": lifetime,
            "peak_rss_lifetime_source": source, "rss_samples": self.sampler.samples if self.sampler else 0,
        }
        # Asked last: a runner may import or read things to answer, which must not count above.
        try:
            result["runtime"] = self.runner.memory_info()
        except Exception as e:  # a runtime-reported figure is optional; never lose the measurement for it
            result["runtime"] = {"error": f"{type(e).__name__}: {e}"}
        if self.sampler:
            self.sampler.start()
        return result

    def layers(self, count: int = 20) -> dict[str, Any]:
        """Run ``count`` inferences, then the runtime's per-node times of exactly those runs (``layers`` None: no profiler)."""
        for _ in range(int(count)):
            self.runner.infer(self.feed)
        times = self.runner.layer_times()
        if times is None:
            return {"layers": None}
        keep = slice(len(times["runs"]) - int(count), None)
        return {"layers": {"runs": times["runs"][keep],
                           "nodes": [{**n, "ms": n["ms"][keep]} for n in times["nodes"]]}}

    def close(self) -> None:
        if self.sampler:
            self.sampler.stop()
        if self.runner is not None:
            self.runner.close()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.pop("cmd", None)
        if cmd not in ("load", "warmup", "run", "memory", "layers"):
            raise ValueError(f"unknown worker command {cmd!r}")
        if cmd != "load" and self.runner is None:
            raise ValueError(f"'{cmd}' before 'load'")
        return getattr(self, cmd)(**request)


def main() -> int:
    """Serve requests until ``exit`` or end of input."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # runtimes that print to stdout (XNNPACK banners, TensorRT logs) land on stderr
    sys.stdout = sys.stderr
    worker = Worker()
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            if request.get("cmd") == "exit":
                protocol.write(json.dumps({"ok": True}) + "\n")
                break
            try:
                reply = {"ok": True, **worker.handle(request)}
            except Exception as e:  # the parent turns this into an SfedgeError naming the configuration
                traceback.print_exc()
                reply = {"ok": False, "error": str(e), "type": type(e).__name__, "hint": getattr(e, "hint", None)}
            protocol.write(json.dumps(reply) + "\n")
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
