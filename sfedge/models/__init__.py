"""Model registry and the built-in model families (U-Net, Factorizer)."""

from sfedge.models.registry import ModelEntry, create_model, input_shape, list_models, model_entry, register_model

__all__ = ["ModelEntry", "create_model", "input_shape", "list_models", "model_entry", "register_model"]
