"""Atomic writes and content hashes.

Every file sfedge produces is written to a temporary name in the destination
folder and renamed into place, so an interrupted run never leaves a file (or a
bundle folder) that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sfedge.errors import SfedgeError

__all__ = ["read_schema_json", "write_error", "atomic_path", "atomic_dir", "write_json", "write_text", "sha256_file", "sha256_bytes"]


def write_error(path: str | os.PathLike[str], error: OSError) -> SfedgeError:
    """The one-line error for a failed write (full disk, read-only folder, file size limit)."""
    return SfedgeError(f"could not write {path}: {error.strerror or error}", "check free disk space and permissions")


def _writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SfedgeError(f"cannot create output folder {folder}: {e.strerror}", "choose a writable folder with -o") from e
    if not os.access(folder, os.W_OK):
        raise SfedgeError(f"output folder {folder} is not writable", "choose a writable folder with -o")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    _writable_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; give them the usual permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise write_error(path, e) from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it onto ``path`` only if the block succeeds.

    An existing ``path`` is replaced (when ``replace``) only after the new one is complete.
    """
    path = Path(path)
    _writable_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from e
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if path.exists():
            if not replace:
                raise SfedgeError(f"{path} already exists", "remove it or choose another output folder")
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: object) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o: object) -> object:
    """JSON for the numpy scalars and arrays and the paths that results carry."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_schema_json(path: Path, schema: str, error: type[SfedgeError], rebuild_hint: str) -> dict:
    """A JSON document that declares ``"schema": schema`` (manifests, reports); ``error`` when unreadable or another schema."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{path} is unreadable or corrupt ({e})", rebuild_hint) from e
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise error(f"{path} has schema {found!r}", f"this sfedge reads {schema}; {rebuild_hint}")
    return doc
