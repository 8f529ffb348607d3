"""The options every verb that takes a model shares: the model spec, --config, --weights, --task.

A model is a checkpoint, a registry name, ``FILE.py:factory``,
``package.module:factory`` (``monai.networks.nets:BasicUNet``) or a
``torch.export`` program (``.pt2``); ``--config`` gives the factory's keyword
arguments as JSON (inline or a file), ``--weights`` a state_dict
(``.pt``/``.pth`` read with ``torch.load(weights_only=True)``, or
``.safetensors``), ``--task`` what the output means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sfedge.errors import ConfigError
from sfedge.parity import TASKS

__all__ = ["MODEL_HELP", "add_model_options", "model_options", "parse_config"]

MODEL_HELP = ("checkpoint (.safetensors), registry name, FILE.py:factory, package.module:factory "
              "(e.g. monai.networks.nets:BasicUNet), or a torch.export program (.pt2)")


def add_model_options(p: argparse.ArgumentParser, *, task: bool = True) -> None:
    """--config, --weights (and --task) for the verb's model argument."""
    g = p.add_argument_group("your own model (with FILE.py:factory or package.module:factory)")
    g.add_argument("--config", help="the factory's keyword arguments as JSON, inline or a .json file, e.g. "
                                    "'{\"spatial_dims\": 2, \"in_channels\": 3, \"out_channels\": 1}'")
    g.add_argument("--weights", help="the model's state_dict: .pt/.pth (torch.load weights_only) or .safetensors "
                                     "(a MONAI bundle's models/model.pt is one)")
    if task:
        g.add_argument("--task", choices=TASKS, help="what the output means (default: the checkpoint's, else "
                                                     "detected: 1 channel binary, several multiclass)")


def parse_config(text: str | None) -> dict[str, Any]:
    """--config: inline JSON or the path of a JSON file; a one-line error for anything else."""
    if not text:
        return {}
    path = Path(text)
    if not text.lstrip().startswith("{") and path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"--config file {path} does not exist", "give inline JSON or an existing .json file")
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config is not valid JSON ({e})", "e.g. --config '{\"in_channels\": 1}' or a .json file") from e
    if not isinstance(value, dict):
        raise ConfigError("--config must be a JSON object of keyword arguments", "e.g. --config '{\"in_channels\": 1}'")
    return value


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments resolve_model / build_bundle take, from the parsed options."""
    return {"config": parse_config(getattr(args, "config", None)), "weights": getattr(args, "weights", None),
            "task": getattr(args, "task", None)}
