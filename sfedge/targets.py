"""Targets: one TOML file per device, validated against a schema.

A target says which backend(s) build for the device, which precisions it
allows, the input layout and size, the parity tolerances per precision, and
facts about the device (TensorRT version and SM for Jetsons; CPU architecture
and cores for phones and boards).  Built-in targets live in the repository's
``targets/`` folder (also shipped inside the package); users add their own by
dropping a file there or passing a path.

Torch-free: the device runtime reads targets from manifests.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfedge.backends.registry import BACKENDS, BUILD_BACKENDS
from sfedge.errors import ConfigError, UnknownNameError
from sfedge.manifest import is_safe_name
from sfedge.parity import TOLERANCE_KEYS, Tolerance, tolerance_for

__all__ = ["Target", "load_target", "list_targets", "target_dirs", "PRECISIONS", "LAYOUTS", "DEFAULT_TARGET"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
LAYOUTS = ("NCHW", "NHWC")
DEFAULT_TARGET = "host-cpu"
DEVICE_KEYS = {
    "tensorrt": ("tensorrt", "sm", "jetpack", "gpu", "memory_gb", "dla_cores", "cuda"),
    "cpu": ("arch", "cpu", "cores", "fp16_arithmetic", "memory_gb", "os"),
}
TOP_KEYS = (
    "name", "description", "backend", "precisions", "default_precision", "layout", "threads", "input_size",
    "batch", "tolerances", "device", "require_signature", "allowed_signers",
)


@dataclass(frozen=True)
class Target:
    """A deployment device: how to build for it and what it is."""

    name: str
    description: str
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    default_precision: str
    layout: str
    threads: int
    input_size: tuple[int, int]
    batch: int = 1
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    # `sfedge verify` and the on-device build of this target's bundles require a valid SSH signature
    # (sfedge.signing) by a key in `allowed_signers` (a path relative to the target file, or --allowed-signers).
    require_signature: bool = False
    allowed_signers: str | None = None

    @property
    def backend(self) -> str:
        """The primary backend (the first listed)."""
        return self.backends[0]

    @property
    def tensorrt_version(self) -> str | None:
        v = self.device.get("tensorrt")
        return str(v) if v is not None else None

    def tolerance(self, precision: str) -> Tolerance:
        """Tolerance for ``precision``; sensible defaults when the file gives none."""
        return tolerance_for(self.tolerances, precision)

    def check_precision(self, precision: str) -> str:
        """``precision`` if this target allows it, else an error listing the allowed ones."""
        if precision not in self.precisions:
            raise UnknownNameError(f"precision for target {self.name}", precision, list(self.precisions))
        return precision

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerances"] = {k: v.as_dict() for k, v in self.tolerances.items()}
        d["backends"], d["precisions"], d["input_size"] = list(self.backends), list(self.precisions), list(self.input_size)
        return d


def target_dirs() -> list[Path]:
    """Where targets are looked up: $SFEDGE_TARGETS (os.pathsep-separated), ./targets, the built-ins."""
    dirs = [Path(p) for p in os.environ.get("SFEDGE_TARGETS", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "targets")
    dirs.append(Path(__file__).resolve().parent.parent / "targets")  # repository checkout
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(d)
    return out


def list_targets() -> list[Target]:
    """Every target found in :func:`target_dirs` (first folder wins on a name clash)."""
    found: dict[str, Target] = {}
    for d in target_dirs():
        for f in sorted(d.glob("*.toml")):
            if f.stem not in found:
                found[f.stem] = load_target(f)
    return [found[k] for k in sorted(found)]


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """A target by name (searched in :func:`target_dirs`) or by the path of its TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"target file {p} does not exist", "give an existing .toml file or a target name")
        return _parse(p)
    for d in target_dirs():
        f = d / f"{name_or_path}.toml"
        if f.is_file():
            return _parse(f)
    names = sorted({f.stem for d in target_dirs() for f in d.glob("*.toml")})
    raise UnknownNameError("target", str(name_or_path), names)


def _err(path: Path, msg: str, hint: str | None = None) -> ConfigError:
    return ConfigError(f"target {path}: {msg}", hint)


def _choice(path: Path, key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise _err(path, f"bad value {value!r} for '{key}'", f"valid choices: {', '.join(valid)}")
    return value


def _parse(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise _err(path, f"cannot read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise _err(path, f"is not valid TOML ({e})") from e
    for key in data:
        if key not in TOP_KEYS:
            raise _err(path, f"unknown key '{key}'", f"valid keys: {', '.join(TOP_KEYS)}")
    for key in ("backend", "precisions", "input_size"):
        if key not in data:
            raise _err(path, f"missing required key '{key}'", f"valid keys: {', '.join(TOP_KEYS)}")
    backend = data["backend"]
    backends = tuple(backend) if isinstance(backend, list) else (backend,)
    if not backends:
        raise _err(path, "'backend' is empty", f"valid choices: {', '.join(BUILD_BACKENDS)}")
    for b in backends:
        _choice(path, "backend", b, BUILD_BACKENDS)
    precisions = data["precisions"]
    if not isinstance(precisions, list) or not precisions:
        raise _err(path, "'precisions' must be a non-empty list", f"valid choices: {', '.join(PRECISIONS)}")
    for p in precisions:
        _choice(path, "precisions", p, PRECISIONS)
        if not any(p in BACKENDS[b].precisions for b in backends):
            raise _err(path, f"precision '{p}' is not supported by backend(s) {', '.join(backends)}",
                       f"valid choices: {', '.join(sorted({q for b in backends for q in BACKENDS[b].precisions}))}")
    default = data.get("default_precision", precisions[0])
    _choice(path, "default_precision", default, tuple(precisions))
    layout = _choice(path, "layout", data.get("layout", "NCHW"), LAYOUTS)
    threads = data.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise _err(path, f"bad value {threads!r} for 'threads'", "give a positive integer")
    size = data["input_size"]
    if (
        not isinstance(size, list) or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise _err(path, f"bad value {size!r} for 'input_size'", "give [height, width] as positive integers")
    batch = data.get("batch", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise _err(path, f"bad value {batch!r} for 'batch'", "give a positive integer")
    tolerances: dict[str, Tolerance] = {}
    for prec, tol in (data.get("tolerances") or {}).items():
        _choice(path, "tolerances", prec, PRECISIONS)
        if not isinstance(tol, dict):
            raise _err(path, f"'tolerances.{prec}' must be a table", f"valid keys: {', '.join(TOLERANCE_KEYS)}")
        for k, v in tol.items():
            if k not in TOLERANCE_KEYS:
                raise _err(path, f"unknown key 'tolerances.{prec}.{k}'", f"valid keys: {', '.join(TOLERANCE_KEYS)}")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise _err(path, f"bad value {v!r} for 'tolerances.{prec}.{k}'", "give a non-negative number")
        tolerances[prec] = Tolerance(**{k: float(v) for k, v in tol.items()})
    device = data.get("device") or {}
    if not isinstance(device, dict):
        raise _err(path, "'device' must be a table")
    kind = "tensorrt" if "tensorrt" in backends else "cpu"
    for k in device:
        if k not in DEVICE_KEYS[kind]:
            raise _err(path, f"unknown key 'device.{k}' for a {kind} target", f"valid keys: {', '.join(DEVICE_KEYS[kind])}")
    if kind == "tensorrt":
        for k in ("tensorrt", "sm"):
            if k not in device:
                raise _err(path, f"a TensorRT target needs 'device.{k}'", "e.g. tensorrt = \"10.3\", sm = 87")
        if not isinstance(device["sm"], int):
            raise _err(path, f"bad value {device['sm']!r} for 'device.sm'", "give the SM as an integer, e.g. 87 for Orin")
        _tensorrt_version_tuple(path, str(device["tensorrt"]))
    name = data.get("name", path.stem)
    if not is_safe_name(name):
        raise _err(path, f"bad target name {name!r}", "use letters, digits, '.', '_' and '-' only (it names files "
                   "and goes into generated scripts)")
    if name != path.stem:
        raise _err(path, f"'name' is '{name}' but the file is named {path.name}", f"rename the file to {name}.toml or fix 'name'")
    require_signature = data.get("require_signature", False)
    if not isinstance(require_signature, bool):
        raise _err(path, f"bad value {require_signature!r} for 'require_signature'", "give true or false")
    signers = data.get("allowed_signers")
    if signers is not None and not isinstance(signers, str):
        raise _err(path, f"bad value {signers!r} for 'allowed_signers'", "give the path of an allowed_signers file")
    if signers is not None:
        signers = str((path.parent / Path(signers).expanduser()).absolute())
    return Target(
        name=name,
        description=str(data.get("description", "")),
        backends=backends,
        precisions=tuple(precisions),
        default_precision=default,
        layout=layout,
        threads=threads,
        input_size=(size[0], size[1]),
        batch=batch,
        tolerances=tolerances,
        device=dict(device),
        path=str(path),
        require_signature=require_signature,
        allowed_signers=signers,
    )


def _tensorrt_version_tuple(path: Path, v: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(x) for x in v.split("."))
    except ValueError as e:
        raise _err(path, f"bad value {v!r} for 'device.tensorrt'", "give a version such as \"10.3\" or \"8.5.2\"") from e
    if not parts or parts[0] < 8:
        raise _err(path, f"TensorRT {v} is not supported", "sfedge supports TensorRT 8.5 and newer")
    return parts
