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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from sfedge.errors import ConfigError, UnknownNameError

__all__ = ["register_model", "list_models", "create_model", "model_entry", "ModelEntry", "input_shape"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its factory, one-line description and default config."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    defaults: dict


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


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (UnknownNameError lists the valid names)."""
    if name not in _REGISTRY:
        raise UnknownNameError("model", name, list(_REGISTRY))
    return _REGISTRY[name]


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
    model.sfedge_name = name  # type: ignore[assignment]
    model.sfedge_config = full  # type: ignore[assignment]
    return model


def input_shape(config: dict, size: Sequence[int] = (256, 256)) -> tuple[int, int, int, int]:
    """The static NCHW input of a model built from ``config``: batch 1, its channels, and its own fixed
    ``input_size`` where it has one (the Factorizer's positional embedding), else ``size`` (H, W)."""
    hw = config.get("input_size") or size
    return (1, int(config.get("in_channels", 3)), int(hw[0]), int(hw[1]))

