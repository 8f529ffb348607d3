"""The bundle manifest's schema, and the one rule for every path read from a bundle.

A bundle is untrusted input: someone hands it to a user, who copies it to a
clinic device and runs commands on it.  So before anything reads a manifest's
numbers or opens one of its paths, :func:`validate_manifest` holds it to a
schema (pydantic), and :func:`confined` resolves each path it names.

What the schema is strict about is what steers verification: the schema tag,
the precision, the per-precision tolerances, the artifacts (path, backend,
kind, precision, sha256, size, tensors), the ``files`` table that lists every
file with its sha256, and the reference data.  Every artifact, companion file
and reference file must be listed in ``files``, and each artifact's own
``sha256`` must be the one listed there.  Keys that are only data (the model's
description and metrics, the toolchain, a build's ``failures``, parity records
with extra metrics) may carry more fields, so the manifest can grow without
loosening any of that.  Numpy-free; device side.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from sfedge.errors import MalformedBundleError
from sfedge.parity import DEFAULT_TOLERANCES, TASKS, TOLERANCE_KEYS

__all__ = [
    "SCHEMA", "MAX_MANIFEST_BYTES", "MAX_FILES", "PRECISIONS", "SAFE_NAME", "Manifest", "validate_manifest",
    "check_relpath", "confined", "is_safe_name",
]

SCHEMA = "sfedge-bundle/1"
MAX_MANIFEST_BYTES = 4 << 20  # real manifests are a few KiB; anything near this is not one
MAX_FILES = 10_000
PRECISIONS = tuple(DEFAULT_TOLERANCES)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256 = r"^[0-9a-f]{64}$"
_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def is_safe_name(name: object) -> bool:
    """True for names made of letters, digits, '.', '_' and '-' (not starting with a dot or dash): target and backend names."""
    return isinstance(name, str) and SAFE_NAME.match(name) is not None and ".." not in name


def check_relpath(rel: object) -> str:
    """``rel`` if it is a plain relative POSIX path (no '..', '.', empty part, absolute path, drive, backslash or control character).

    Why so strict: every such path is joined onto the bundle folder and then
    read or written; anything that could mean a different place on another
    OS or after normalisation is refused rather than interpreted.
    """
    if not isinstance(rel, str) or not rel or len(rel) > 1024:
        raise ValueError(f"{rel!r} is not a relative path")
    if _BAD_CHARS.search(rel):
        raise ValueError(f"{rel!r} has a backslash or control character")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise ValueError(f"{rel!r} is an absolute path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or PurePosixPath(rel).as_posix() != rel:
        raise ValueError(f"{rel!r} leaves the bundle or is not normalised ('..', '.', or an empty part)")
    return rel


def confined(base: str | Path, rel: object, what: str = "path") -> Path:
    """``base / rel``, after checking that ``rel`` is a plain relative path that resolves inside ``base``.

    Symlinks are resolved, so a link pointing out of the folder is refused as
    well.  MalformedBundleError (exit code 3) otherwise, naming the path.
    """
    try:
        check_relpath(rel)
    except ValueError as e:
        raise MalformedBundleError(f"{what} {e}", "a bundle names only files inside itself; rebuild it") from None
    root = Path(base).resolve()
    target = (root / str(rel)).resolve()
    if target != root and root not in target.parents:
        raise MalformedBundleError(f"{what} {rel!r} resolves outside {base} (a symlink out of the bundle)",
                                   "remove the link; a bundle holds regular files only")
    return Path(base) / str(rel)


RelPath = Annotated[str, AfterValidator(check_relpath)]
Sha256 = Annotated[str, Field(pattern=_SHA256)]
Precision = Literal["fp32", "fp16", "int8", "int8-dynamic"]
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _safe_name(v: str) -> str:
    if not is_safe_name(v):
        raise ValueError(f"{v!r} is not a safe name (letters, digits, '.', '_', '-')")
    return v


SafeName = Annotated[str, AfterValidator(_safe_name)]


class _Strict(BaseModel):
    """Parts that steer verification: no unknown keys, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """Parts that are data: unknown keys kept, known ones still typed."""

    model_config = ConfigDict(extra="allow", strict=True)


class FileEntry(_Strict):
    sha256: Sha256
    size: int = Field(ge=0)


# One optional finite number per key sfedge.parity.Tolerance has (no other key): the keys stay in step with it.
ToleranceEntry = create_model(  # type: ignore[call-overload]
    "ToleranceEntry", __base__=_Strict, **{key: (Finite | None, None) for key in TOLERANCE_KEYS})


class TensorEntry(_Strict):
    name: str = Field(max_length=1024)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=16)
    dtype: Literal[_DTYPES]  # type: ignore[valid-type]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: Annotated[Finite, Field(gt=0)] | None = None
    zero_point: int | None = None


class TargetRecord(_Open):
    name: SafeName
    tolerances: dict[Precision, ToleranceEntry] = Field(default_factory=dict)
    threads: int | None = Field(default=None, ge=1, le=1024)


class ArtifactEntry(_Open):
    path: RelPath
    backend: SafeName
    kind: SafeName  # onnx | tflite | engine | device-folder, or a new backend's own kind
    precision: Precision
    inputs: list[TensorEntry] = Field(max_length=64)
    outputs: list[TensorEntry] = Field(max_length=64)
    sha256: Sha256 | None = None
    size: int | None = Field(default=None, ge=0)
    files: list[RelPath] = Field(default_factory=list, max_length=MAX_FILES)
    parity: dict[str, Any] = Field(default_factory=dict)
    float_layers: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _hashed(self) -> ArtifactEntry:
        if self.kind != "device-folder" and self.sha256 is None:
            raise ValueError(f"artifact {self.path} has no sha256")
        return self


class ShiftedEntry(_Open):
    """The shifted (augmented) held-out split and its torch outputs (int8 gates and ``verify`` check it)."""

    inputs: RelPath
    outputs: RelPath


class ReferenceEntry(_Open):
    inputs: RelPath
    outputs: RelPath
    shifted: ShiftedEntry | None = None


class ModelRecord(_Open):
    name: str = Field(min_length=1, max_length=256)
    task: Literal[TASKS] | None = None  # type: ignore[valid-type]  # decides which parity metrics apply


class WholeImageEntry(_Open):
    """The whole held-out image and its torch reference (``verify --whole-image``)."""

    input: RelPath
    reference: RelPath


class OriginEntry(_Strict):
    """The manifest as first built, kept when a device adds an engine (see sfedge.device_build)."""

    manifest: Literal["manifest.origin.json"]
    sha256: Sha256


class Manifest(_Open):
    """The schema of manifest.json (``sfedge-bundle/1``)."""

    schema_: Literal["sfedge-bundle/1"] = Field(alias="schema")
    precision: Precision
    model: ModelRecord
    target: TargetRecord
    artifacts: list[ArtifactEntry] = Field(min_length=1, max_length=64)
    files: dict[RelPath, FileEntry] = Field(min_length=1, max_length=MAX_FILES)
    reference: ReferenceEntry | None = None  # every built bundle has one; verify refuses a bundle without it
    whole_image: WholeImageEntry | None = None
    origin: OriginEntry | None = None

    @field_validator("reference", mode="before")
    @classmethod
    def _empty_reference(cls, v: object) -> object:
        return None if v == {} else v  # a hand-wrapped bundle for profiling only

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """Everything verify relies on is listed in ``files``; every artifact is this bundle's precision."""
        seen: set[str] = set()
        for a in self.artifacts:
            if a.path in seen:
                raise ValueError(f"artifact {a.path} is listed twice")
            seen.add(a.path)
            if a.precision != self.precision:
                raise ValueError(f"artifact {a.path} is {a.precision} in a {self.precision} bundle")
            if a.kind == "device-folder":
                if not any(f.startswith(a.path + "/") for f in self.files):
                    raise ValueError(f"device folder {a.path} has no file listed in 'files'")
            else:
                entry = self.files.get(a.path)
                if entry is None:
                    raise ValueError(f"artifact {a.path} is not listed in 'files'")
                if entry.sha256 != a.sha256 or (a.size is not None and entry.size != a.size):
                    raise ValueError(f"artifact {a.path}: its sha256/size differ from its 'files' entry")
            for f in a.files:
                if f not in self.files:
                    raise ValueError(f"file {f} of artifact {a.path} is not listed in 'files'")
        shifted = self.reference.shifted if self.reference is not None else None
        listed = [*((self.reference.inputs, self.reference.outputs) if self.reference is not None else ()),
                  *((shifted.inputs, shifted.outputs) if shifted is not None else ()),
                  *((self.whole_image.input, self.whole_image.reference) if self.whole_image is not None else ())]
        for f in listed:
            if f not in self.files:
                raise ValueError(f"reference file {f} is not listed in 'files'")
        return self


def validate_manifest(doc: object, where: str | Path) -> Manifest:
    """The parsed manifest, or MalformedBundleError with the first problem on one line (exit code 3)."""
    if isinstance(doc, dict) and doc.get("schema") != SCHEMA:
        raise MalformedBundleError(f"{where} has schema {doc.get('schema')!r}",
                                   f"this sfedge reads {SCHEMA}; rebuild the bundle with it")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"]) or "manifest"
        msg = str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise MalformedBundleError(f"{where}: {loc}: {msg}{more}",
                                   "not a manifest sfedge wrote, or edited by hand; rebuild the bundle") from None
