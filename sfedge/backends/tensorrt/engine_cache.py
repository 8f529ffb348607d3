"""A cache of built engines, keyed by everything that makes an engine what it is.

Building an engine takes minutes on a Jetson; rebuilding the same one is
waste.  An engine is valid only for the exact ONNX, TensorRT release, GPU
(name and SM), precision, input shapes and builder options it was built with,
so the key is the sha256 of all of those.  Entries are written atomically
(temporary name, then rename) with a small JSON beside each engine that
records the key's parts and the engine's own hash; a lookup whose file no
longer matches that hash is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfedge.fileio import atomic_path, sha256_file, write_json

__all__ = ["engine_cache_key", "EngineCache", "default_engine_cache_dir"]


def default_engine_cache_dir() -> Path:
    """$SFEDGE_CACHE/engines, else ~/.cache/sfedge/engines (devices build without a repository checkout)."""
    root = os.environ.get("SFEDGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sfedge") / "engines"


def _key_parts(
    onnx_sha256: str, tensorrt_version: str, gpu_name: str, sm: int, precision: str,
    input_shapes: dict[str, Sequence[int]], builder_options: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt": str(tensorrt_version),
        "gpu": str(gpu_name),
        "sm": int(sm),
        "precision": precision,
        "input_shapes": {k: [int(d) for d in v] for k, v in sorted(input_shapes.items())},
        "builder_options": dict(sorted((builder_options or {}).items())),
    }


def engine_cache_key(
    *,
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    sm: int,
    precision: str,
    input_shapes: dict[str, Sequence[int]],
    builder_options: dict[str, Any] | None = None,
) -> str:
    """Hex sha256 identifying one engine build; any differing input gives a different key."""
    parts = _key_parts(onnx_sha256, tensorrt_version, gpu_name, sm, precision, input_shapes, builder_options)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class EngineCache:
    """Engines in one folder, ``<key>.engine`` plus ``<key>.json``."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_engine_cache_dir()

    def path_for(self, key: str) -> Path:
        return self.folder / f"{key}.engine"

    def lookup(self, key: str) -> Path | None:
        """The cached engine for ``key``, or None (missing, or its bytes no longer match the record)."""
        engine, record = self.path_for(key), self.folder / f"{key}.json"
        if not engine.is_file() or not record.is_file():
            return None
        try:
            expected = json.loads(record.read_text()).get("engine_sha256")
        except (OSError, json.JSONDecodeError):
            return None
        return engine if expected == sha256_file(engine) else None

    def store(self, key: str, engine_file: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
        """Copy ``engine_file`` into the cache under ``key`` (atomically) and record ``meta`` beside it."""
        target = self.path_for(key)
        with atomic_path(target) as tmp:
            shutil.copyfile(engine_file, tmp)
        write_json(self.folder / f"{key}.json", {"key": key, "engine_sha256": sha256_file(target), **(meta or {})})
        return target
