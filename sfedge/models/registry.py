"""The model registry: every model sfedge can build, by name.

A registered factory takes keyword-only config values (JSON types only) and
returns an ``nn.Module``.  :func:`create_model` validates the config against the
factory's signature, builds the model and stamps it with ``sfedge_name`` and the
*complete* ``sfedge_config`` (defaults filled in), which is what checkpoints and
manifests record so the model can be rebuilt exactly.  The built-in families
register themselves when :mod:`sfedge.models` is imported (its ``__init__``
imports them after this module), so the registry never imports the models.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from sfedge.errors import ConfigError, UnknownNameError

__all__ = ["register_model", "list_models", "create_model", "model_entry", "ModelEntry", "input_shape", "ENTRY_POINT_GROUP"]

# Packages register models for sfedge under this entry-point group: name = "package.module:factory".
ENTRY_POINT_GROUP = "sfedge.models"


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its factory, one-line description and default config."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    defaults: dict
    source: dict = field(default_factory=dict)  # where it came from when not built in (an entry point)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, **preset: object) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``factory`` under ``name``; ``preset`` overrides its defaults.

    One factory can be registered under several names with different presets
    (``unet`` and ``unet-sfconv`` differ only by ``conv="sfconv"``).
    """

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        sig = inspect.signature(factory)
        defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        unknown = set(preset) - set(defaults)
        if unknown:
            raise ConfigError(f"preset keys {sorted(unknown)} are not parameters of {factory.__name__}")
        defaults.update(preset)
        _REGISTRY[name] = ModelEntry(name, factory, description, _jsonable(defaults))
        return factory

    return wrap


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Models installed packages register under :data:`ENTRY_POINT_GROUP` (not loaded until used)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_models() -> list[str]:
    """Names of every registered model, sorted: the built-in ones and those installed packages register."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (UnknownNameError lists the valid names).

    A name from an installed package's entry point is imported on first use;
    its factory's keyword arguments and their defaults become its config.
    """
    if name not in _REGISTRY:
        eps = _entry_points()
        if name not in eps:
            raise UnknownNameError("model", name, list_models())
        _REGISTRY[name] = _load_entry_point(eps[name])
    return _REGISTRY[name]


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> ModelEntry:
    try:
        factory = ep.load()
    except Exception as e:  # the package's own import error: say which package and entry point
        raise ConfigError(f"model '{ep.name}' (entry point {ep.value}) failed to import: {type(e).__name__}: {e}",
                          "reinstall the package that registers it") from e
    if not callable(factory):
        raise ConfigError(f"entry point {ep.name} = {ep.value} is not callable", "point it at a model factory")
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = []
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name != "self"}
    doc = (inspect.getdoc(factory) or "").splitlines()
    dist = getattr(ep, "dist", None)
    source = {"kind": "entry_point", "spec": ep.value, "name": ep.name,
              "package": dist.name if dist else None, "package_version": dist.version if dist else None}
    return ModelEntry(ep.name, factory, doc[0] if doc else f"from {ep.value}", _jsonable(defaults), source)


def create_model(name: str, **config: object) -> nn.Module:
    """Build model ``name`` with ``config`` overriding its defaults; unknown keys are an error."""
    entry = model_entry(name)
    unknown = set(config) - set(entry.defaults)
    if unknown:
        raise ConfigError(
            f"model '{name}' has no config key(s) {', '.join(sorted(unknown))}",
            f"valid keys: {', '.join(sorted(entry.defaults))}",
        )
    full = dict(entry.defaults)
    full.update(_jsonable(config))
    model = entry.factory(**full)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model '{name}' returned a {type(model).__name__}, not a torch nn.Module",
                          "its factory must build the network")
    model.sfedge_name = name  # type: ignore[assignment]
    model.sfedge_config = full  # type: ignore[assignment]
    if entry.source:
        model.sfedge_source = {**entry.source, "config": full}  # type: ignore[assignment]
    return model


def input_shape(config: dict, size: Sequence[int] = (256, 256), model: nn.Module | None = None) -> tuple[int, int, int, int]:
    """The static NCHW input of a model built from ``config``: batch 1, its channels, and its own fixed
    ``input_size`` where it has one (the Factorizer's positional embedding), else ``size`` (H, W).

    Channels: ``in_channels`` in the config (sfedge's and MONAI's name for it), else the first
    convolution of ``model`` (a user's network may name the argument anything), else 3.
    """
    hw = config.get("input_size") or size
    channels = config.get("in_channels")
    if channels is None and model is not None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))), None)
        channels = first.in_channels if first is not None else None
    return (1, int(channels or 3), int(hw[0]), int(hw[1]))

