"""Workloads of known cost for the profiler's tests, and a way to wrap artifacts as bundles.

* :class:`BusyLoopRunner`: a Runner whose artifact is a JSON file naming a
  loop of small matrix products and how many times one inference repeats it,
  so repeats=1 and repeats=2 cost 1:2 (up to the call overhead, well under 1%).
* :func:`matmul_chain`: a real ONNX model, a chain of ``n`` square MatMuls,
  whose weights make RSS grow by a known amount.
* :func:`wrap_bundle`: a bundle folder (schema ``sfedge-bundle/1``, hashes
  included) around artifact files, for tests that must not wait for a build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.artifact import TensorSpec
from sfedge.backends.base import Runner

RUNNER_SPEC = f"{Path(__file__).resolve()}:BusyLoopRunner"


class BusyLoopRunner(Runner):
    """Per inference, ``repeats`` times the same ``iterations`` of a 64x64 float32 matrix product.

    The artifact is a JSON file {"iterations": N, "repeats": R}: repeats=2
    does exactly the work of repeats=1 twice (the same native kernel on the
    same L1-resident matrices).  Compute-bound native code on purpose: a
    pure-Python loop, or element-wise ops on larger arrays, change speed by
    several percent from one process to the next (code and memory placement).
    """

    backend = "busyloop"

    def _load(self) -> None:
        spec = json.loads(self.path.read_text())
        self.iterations, self.repeats = int(spec["iterations"]), int(spec.get("repeats", 1))
        rng = np.random.default_rng(1)
        self._x = rng.standard_normal((64, 64)).astype(np.float32)
        self._y = rng.standard_normal((64, 64)).astype(np.float32)
        self._z = np.empty((64, 64), np.float32)
        self.inputs = [TensorSpec("x", [1], "float32", "NCHW")]
        self.outputs = [TensorSpec("y", [64, 64], "float32", "NCHW")]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for _ in range(self.repeats):
            for _ in range(self.iterations):
                np.dot(self._x, self._y, out=self._z)
        return {"y": self._z}

    def _close(self) -> None:
        pass


def busy_loop(path: Path, iterations: int, repeats: int = 1) -> Path:
    path.write_text(json.dumps({"iterations": iterations, "repeats": repeats}))
    return path


def matmul_chain(path: Path, n: int, d: int = 256, seed: int = 0, rows: int | None = None) -> Path:
    """ONNX: y = x @ W1 @ ... @ Wn with x (1, rows, d) (rows default d); weights take n * d * d * 4 bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    r = d if rows is None else rows
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, r, d])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, r, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def wrap_bundle(folder: Path, artifacts: list[dict[str, Any]], *, model: str, conv: str = "dense",
                s: float | None = None, precision: str = "fp32", target: str = "host-cpu", threads: int = 1) -> Path:
    """A bundle folder around existing artifact files (copied in); ``artifacts``: [{file, backend, precision?}]."""
    import shutil

    from sfedge.bundle import MANIFEST, SCHEMA, hash_files
    from sfedge.fileio import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for a in artifacts:
        src = Path(a["file"])
        shutil.copy(src, folder / src.name)
        entries.append({
            "path": src.name, "backend": a["backend"], "kind": src.suffix.lstrip("."),
            "precision": a.get("precision", precision), "inputs": [], "outputs": [], "float_layers": [],
            "parity": {}, "files": [], "notes": [], "meta": {},
            "sha256": sha256_file(folder / src.name), "size": (folder / src.name).stat().st_size,
        })
    manifest = {
        "schema": SCHEMA, "sfedge_version": "0.1.0", "created": "2026-01-01T00:00:00Z", "build_key": "test",
        "model": {"name": model, "family": "matmul-chain", "conv": conv, "s": s, "config": {"d": 256}},
        "target": {"name": target, "threads": threads}, "precision": precision,
        "calibration": {}, "toolchain": {}, "artifacts": entries, "reference": {}, "files": hash_files(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder
