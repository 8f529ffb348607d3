"""Where a model comes from: a registry name, your file, an installed package, or a ``torch.export`` program.

A *model spec* is what every verb that takes a model accepts:

* a registry name: sfedge's own (``unet-sfconv``) or one a package registers
  through the ``sfedge.models`` entry-point group (``sfedge build mypkg-net``
  after ``pip install mypkg``);
* ``path/to/file.py:factory`` or ``package.module:factory`` (the ``module:attr``
  convention of uvicorn and gunicorn): a callable, or an ``nn.Module``
  class, called with the config's keyword arguments
  (``monai.networks.nets:BasicUNet`` works as written);
* ``model.pt2``: a ``torch.export`` program, built and run without the
  user's code (it cannot be factorized or trained here).

:func:`build_from_spec` builds the model and stamps it with what checkpoints
and manifests record (``sfedge_name``, ``sfedge_config``, ``sfedge_source``),
so a model built from a spec can be saved and rebuilt from its checkpoint
alone.  Nothing here runs code the user did not name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfedge.errors import CheckpointError, ConfigError, UnknownNameError
from sfedge.models.registry import create_model, list_models

__all__ = [
    "ModelSpec", "parse_spec", "build_from_spec", "load_exported", "spec_label", "factory_defaults", "weights_sha256",
]

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``kind`` is registry, file, module or exported; ``target`` the name, path or module."""

    kind: str
    target: str
    attr: str = ""

    @property
    def text(self) -> str:
        return f"{self.target}:{self.attr}" if self.attr else self.target


_MODULE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def parse_spec(text: str) -> ModelSpec:
    """Classify ``text`` (see the module docstring); a one-line error says which forms are accepted."""
    text = str(text).strip()
    forms = ("a registry name (sfedge inspect --models), FILE.py:factory, package.module:factory, or a "
             "torch.export program (.pt2)")
    if text.endswith(".pt2"):
        return ModelSpec("exported", text)
    if text.lower().endswith(WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"{text} holds weights (a state_dict), not a model sfedge can build",
            f"give the model's code and the weights together, e.g. `net.py:make_net --weights {Path(text).name}` "
            "or `monai.networks.nets:BasicUNet --config ... --weights model.pt`",
        )
    if ":" in text:
        target, _, attr = text.rpartition(":")
        if not attr.isidentifier():
            raise ConfigError(f"'{text}': '{attr}' is not a Python name", f"give {forms}")
        if target.endswith(".py") or "/" in target or "\\" in target:
            return ModelSpec("file", target, attr)
        if _MODULE_RE.match(target):
            return ModelSpec("module", target, attr)
        raise ConfigError(f"'{text}' is neither FILE.py:factory nor package.module:factory", f"give {forms}")
    if text in list_models():
        return ModelSpec("registry", text)
    raise UnknownNameError("model", text, list_models())


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist", "give the path of the .py file that defines the model")
    name = "sfedge_user_" + re.sub(r"\W", "_", path.stem) + "_" + hashlib.sha256(str(path).encode()).hexdigest()[:8]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}", "give a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ConfigError(f"importing {path} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "run the file with python to see the full error") from e
    return module


def _factory(spec: ModelSpec) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """The callable a file or module spec names, and the identity to record for it."""
    if spec.kind == "file":
        path = Path(spec.target).expanduser().resolve()
        module = _import_file(path)
        identity = {"kind": "file", "spec": f"{path}:{spec.attr}",
                    "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        try:
            module = importlib.import_module(spec.target)
        except ImportError as e:
            raise ConfigError(f"cannot import module '{spec.target}': {e}",
                              f"pip install the package that provides it, or check the spelling of {spec.text}") from e
        top = spec.target.split(".")[0]
        identity = {"kind": "module", "spec": spec.text, "package_version": _version(top)}
    factory = getattr(module, spec.attr, None)
    if factory is None or not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise ConfigError(f"{spec.text}: '{spec.attr}' is not a callable in {spec.target}",
                          f"callables there include: {', '.join(names) or '(none)'}")
    return factory, identity


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def factory_defaults(factory: Callable[..., Any]) -> dict[str, Any] | None:
    """The keyword arguments ``factory`` accepts, with their defaults (None when it takes ``**kwargs``)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if p.name != "self"]
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def build_from_spec(text: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model ``text`` names with ``config`` as keyword arguments, stamped for checkpoints and manifests."""
    spec = parse_spec(text)
    config = dict(config or {})
    if spec.kind == "exported":
        raise ConfigError(f"{text} is a torch.export program: it is loaded, not built",
                          "use it directly with sfedge build / inspect (it cannot take a --config)")
    if spec.kind == "registry":
        return create_model(spec.target, **config)
    factory, identity = _factory(spec)
    accepted = factory_defaults(factory)
    if accepted is not None:
        unknown = sorted(set(config) - set(accepted))
        if unknown:
            raise ConfigError(f"{spec.text} takes no argument(s) {', '.join(unknown)}",
                              f"its arguments: {', '.join(accepted) or '(none)'}")
    try:
        model = factory(**config)
    except TypeError as e:
        raise ConfigError(f"{spec.text}({', '.join(f'{k}=...' for k in config)}) failed: {e}",
                          "give the arguments it needs with --config '{\"name\": value}' (or a JSON file)") from e
    except Exception as e:
        raise ConfigError(f"{spec.text} raised {type(e).__name__} while building the model: {str(e).splitlines()[0]}",
                          "check --config against the factory's arguments") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec.text} returned a {type(model).__name__}, not a torch nn.Module",
                          "point the spec at a function or class that builds the network")
    model.sfedge_name = spec_label(spec)  # type: ignore[assignment]
    model.sfedge_config = _jsonable(config)  # type: ignore[assignment]
    model.sfedge_source = {**identity, "config": _jsonable(config)}  # type: ignore[assignment]
    return model


def spec_label(spec: ModelSpec) -> str:
    """A short name for files and tables: the factory's name (``make_net``, ``BasicUNet``) or the registry name."""
    if spec.kind in ("registry", "exported"):
        return Path(spec.target).stem if spec.kind == "exported" else spec.target
    return spec.attr


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def load_exported(path: str | Path) -> tuple[nn.Module, tuple[int, ...], str]:
    """A ``torch.export`` program as a runnable module, its static input shape and its weights' sha256.

    The program carries its own graph and weights, so no user code is
    imported; its input shape is the one it was exported with.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported program {path} does not exist", "give a .pt2 file written by torch.export.save")
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # torch raises several types for damaged archives
        raise CheckpointError(f"{path} is not a readable torch.export program ({type(e).__name__})",
                              "re-create it with torch.export.save(torch.export.export(model, (x,)), path)") from e
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(inputs) != 1:
        raise ConfigError(f"{path} takes {len(inputs)} inputs; sfedge builds single-input image models",
                          "export the model with one (N, C, H, W) input")
    shape = tuple(int(d) for d in inputs[0].meta["val"].shape)
    if len(shape) != 4:
        raise ConfigError(f"{path} takes an input of shape {shape}, not (N, C, H, W)", "export a 2D image model")
    module = program.module()
    digest = weights_sha256(dict(program.state_dict))
    module.sfedge_name = path.stem  # type: ignore[assignment]
    module.sfedge_config = {}  # type: ignore[assignment]
    module.sfedge_source = {"kind": "exported", "spec": str(path.resolve()),  # type: ignore[assignment]
                            "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return module, shape, digest


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order: a model's weights identity."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
