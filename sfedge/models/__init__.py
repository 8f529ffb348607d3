"""Model registry and the built-in model families (U-Net, Factorizer).

Importing this package imports the registry first, then the families, whose
``@register_model`` decorators fill it: every way into ``sfedge.models``
(``sfedge.models.registry`` included) runs this first.
"""

from sfedge.models import factorizer, unet  # noqa: E402,F401  (registers the built-in families)
from sfedge.models.registry import ModelEntry, create_model, input_shape, list_models, model_entry, register_model

__all__ = ["ModelEntry", "create_model", "input_shape", "list_models", "model_entry", "register_model"]
