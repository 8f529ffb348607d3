"""Atomic, durable, serialized writes; bounded JSON reads; content hashes.

Every file sfedge produces is written to a temporary name in the destination
folder and renamed into place, so an interrupted run never leaves a file (or a
bundle folder) that looks whole.  On top of that:

- **durable**: files and folders are fsynced before the rename and the parent
  after it (SD cards on devices lose power);
- **no gap**: replacing an existing folder swaps the two atomically
  (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on
  macOS), so readers see the old folder or the new one, never none; only
  where the OS has neither is the old two-rename replace used;
- **serialized**: writers of one destination take a lock file beside it
  (``.<name>.lock``, fcntl; removed by its last holder), so concurrent runs
  wait for each other;
- **self-cleaning**: each ``.part`` temporary is locked by the process writing
  it, and the next writer of the same destination removes ``.part`` siblings
  whose lock it can take (left by kill -9 or a power cut);
- **no user file deleted**: an output folder chosen with ``-o`` is replaced
  only when it carries sfedge's marker for the same kind of output
  (:data:`OUTPUT_MARKER`); any other non-empty folder is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sfedge.errors import OutputFolderError, SfedgeError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic, not serialized
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "read_schema_json", "read_json_bytes", "read_limited", "write_error", "atomic_path", "atomic_dir", "write_json",
    "write_text", "sha256_file", "sha256_bytes", "locked", "check_output_dir", "OUTPUT_MARKER", "fsync_tree",
    "sfedge_code_sha256", "exchange", "lock_file_for",
]

OUTPUT_MARKER = ".sfedge-output"
STALE_FILE_SECONDS = 10.0  # a temporary file this old whose lock is free belongs to a dead writer


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


# -- durability -----------------------------------------------------------------------------------------------------
def _fsync(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Flush ``path`` to the device.  A file that cannot be flushed is an OSError (its data may be lost); a
    folder is best effort (some filesystems and OSes cannot open or flush folders)."""
    if not directory:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``root`` (and ``root``): what a rename onto the final name must follow."""
    for folder, dirs, files in os.walk(root):
        for name in files:
            if stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode):
                _fsync(os.path.join(folder, name))
        for name in dirs:
            _fsync(os.path.join(folder, name), directory=True)
    _fsync(root, directory=True)


# -- locks ------------------------------------------------------------------------------------------------------------
class _Held:
    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.count = 0
        self.fd: int | None = None


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def lock_file_for(path: str | os.PathLike[str]) -> Path:
    """The lock file that serializes writers of ``path``: ``.<name>.lock`` beside it."""
    p = Path(os.path.abspath(path))
    return p.parent / f".{p.name}.lock"


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the writers' lock of ``path`` (blocking; re-entrant within a process, exclusive across processes).

    Why: two builds of one bundle (two terminals, a sweep and a build) must
    not interleave; the second waits and then finds the first one's result.
    """
    lock = lock_file_for(path)
    with _HELD_GUARD:
        held = _HELD.setdefault(str(lock), _Held())
    with held.rlock:
        if held.count == 0 and fcntl is not None:
            _writable_dir(lock.parent)
            held.fd = _acquire(lock)
        held.count += 1
        try:
            yield
        finally:
            held.count -= 1
            if held.count == 0 and held.fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lock)  # removed while still held, so no lock file is left behind
                os.close(held.fd)  # closing releases the flock
                held.fd = None


def _acquire(lock: Path) -> int:
    """An fd holding the flock of ``lock``; retried when the holder removed the file before we got it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(lock, e) from e
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its last holder already unlinked: take the new one


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _remove_stale_parts(path: Path, *, folders: bool) -> None:
    """Remove ``.<name>.*.part`` siblings of ``path`` whose writer is gone (their lock can be taken).

    ``folders``: temporary folders (the caller holds the writers' lock of
    ``path``, so a folder whose own lock is free is dead); else temporary
    files, which are also left alone for :data:`STALE_FILE_SECONDS` after
    their last change (a live writer locks its file right after creating it).
    """
    if fcntl is None:
        return
    pattern = os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.part")
    for part in glob.glob(pattern):
        try:
            st = os.lstat(part)
        except OSError:
            continue
        if folders != stat.S_ISDIR(st.st_mode) or (not folders and not stat.S_ISREG(st.st_mode)):
            continue
        if not folders and time.time() - st.st_mtime < STALE_FILE_SECONDS:
            continue
        try:
            fd = os.open(part, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd):
                if folders:
                    shutil.rmtree(part, ignore_errors=True)
                else:
                    os.unlink(part)
        except OSError:
            pass
        finally:
            os.close(fd)


# -- atomic files and folders --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; fsync it and rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    _writable_dir(path.parent)
    _remove_stale_parts(path, folders=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    _try_lock(fd)  # held until the rename: the file is live, not stale
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; give them the usual permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent, directory=True)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise write_error(path, e) from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange_function() -> Any:
    """The OS call that swaps two paths in one step (Linux renameat2, macOS renamex_np), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, 2)  # RENAME_SWAP
    return None


_EXCHANGE = _exchange_function()


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (True), or False where this OS or filesystem cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95, 1):  # EINVAL, ENOSYS, EOPNOTSUPP, EPERM: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


# Outputs written before the marker existed are recognised by their main document's schema tag.
LEGACY_OUTPUTS = {"report.json": "sfedge-profile/", "compare.json": "sfedge-compare/", "sweep.json": "sfedge-sweep/"}


def _marker_kind(folder: Path) -> str | None:
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
        return str(data["kind"]) if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError):
        pass
    for name, prefix in LEGACY_OUTPUTS.items():
        try:
            if (folder / name).stat().st_size < (256 << 20):
                schema = json.loads((folder / name).read_text()).get("schema", "")
                if isinstance(schema, str) and schema.startswith(prefix):
                    return prefix.removeprefix("sfedge-").rstrip("/")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def check_output_dir(path: str | os.PathLike[str], kind: str) -> None:
    """Refuse (OutputFolderError) an output folder that exists, is not empty and is not sfedge's ``kind`` output.

    Why: ``-o`` names a folder the user chose; replacing it must never delete
    files sfedge did not write.  Call it before the work (so a long run is not
    wasted) and it is checked again when the result is written.
    """
    p = Path(path)
    if not os.path.lexists(p):
        return
    if p.is_symlink() or not p.is_dir():
        raise OutputFolderError(f"output {p} exists and is not a folder", "choose a new folder with -o")
    if not any(p.iterdir()):
        return
    found = _marker_kind(p)
    if found != kind:
        what = f"an sfedge {found} output, not a {kind} output" if found else "files sfedge did not write"
        raise OutputFolderError(f"output folder {p} already holds {what}",
                                "choose a new folder with -o, or remove this one yourself")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = True, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; fsync it and swap it onto ``path`` only if the block succeeds.

    An existing ``path`` is replaced (when ``replace``) only after the new one
    is complete, in one atomic exchange where the OS has one.  ``kind`` marks
    a user-facing output (a report, a comparison, a sweep): the folder gets
    :data:`OUTPUT_MARKER`, and an existing non-empty folder without the same
    marker is refused instead of replaced.  Writers of one ``path`` are
    serialized (:func:`locked`) and clear the ``.part`` folders of dead ones.
    """
    path = Path(os.path.abspath(path))
    _writable_dir(path.parent)
    with locked(path):
        _remove_stale_parts(path, folders=True)
        with contextlib.suppress(OSError):
            shutil.rmtree(path.with_name(f".{path.name}.old"))
        if kind is not None:
            check_output_dir(path, kind)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
            fd = os.open(tmp, os.O_RDONLY)
        except OSError as e:
            raise write_error(path, e) from e
        _try_lock(fd)  # held while this process writes: the folder is live, not stale
        try:
            yield tmp
            if kind is not None:
                (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n")
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
            fsync_tree(tmp)
            if os.path.lexists(path):
                if not replace:
                    raise SfedgeError(f"{path} already exists", "remove it or choose another output folder")
                if kind is not None:
                    check_output_dir(path, kind)  # files may have been dropped in while we worked
                if exchange(tmp, path):
                    shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
                else:
                    old = path.with_name(f".{path.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(path, old)
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync(path.parent, directory=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(path, e) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(fd)


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


@functools.cache
def sfedge_code_sha256() -> str:
    """sha256 over sfedge's own source: every .py file of the package and the target and calibration TOMLs it ships.

    Why in the build key: the version string does not change when the code
    that exports, quantizes or gates does, and a bundle built by other code
    is not "up to date".  Computed once per process (a few ms).
    """
    package = Path(__file__).resolve().parent  # sfedge/
    files = sorted(package.rglob("*.py")) + sorted(package.rglob("*.toml"))
    checkout = (package.parent / "pyproject.toml").is_file()
    for folder in (package.parent / "targets", package.parent / "calibration"):  # a source checkout's built-ins
        if checkout and folder.is_dir():
            files += sorted(folder.glob("*.toml"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(package.parent).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_limited(path: str | os.PathLike[str], max_bytes: int, error: type[SfedgeError], hint: str) -> bytes:
    """The bytes of a regular file no larger than ``max_bytes`` (``error`` otherwise: missing, a symlink, too large)."""
    p = Path(path)
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p} is not a regular file", hint)
        if st.st_size > max_bytes:
            raise error(f"{p} is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit", hint)
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{p} is unreadable ({e.strerror or e})", hint) from e
    if len(data) > max_bytes:
        raise error(f"{p} is over the {max_bytes:,}-byte limit", hint)
    return data


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_json_bytes(data: bytes, where: str | os.PathLike[str], error: type[SfedgeError], hint: str,
                    allow_nan: bool = False) -> object:
    """Strict JSON: UTF-8, no duplicate keys, no nesting deep enough to exhaust the stack, no NaN/Infinity
    unless ``allow_nan`` (profile reports may hold NaN statistics; manifests never do)."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=None if allow_nan else _no_constants,
                          object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise error(f"{where} is not valid JSON ({detail})", hint) from e


def read_schema_json(path: Path, schema: str, error: type[SfedgeError], rebuild_hint: str,
                     max_bytes: int = 256 << 20) -> dict:
    """A JSON document that declares ``"schema": schema`` (manifests, reports); ``error`` when unreadable or another schema."""
    doc = read_json_bytes(read_limited(path, max_bytes, error, rebuild_hint), path, error, rebuild_hint, allow_nan=True)
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise error(f"{path} has schema {found!r}", f"this sfedge reads {schema}; {rebuild_hint}")
    return doc
