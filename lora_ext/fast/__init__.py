"""Unsloth-style entry points: FastLanguageModel, FastVisionModel, loading straight into 4 bits.

See docs/model_api.md ("Unsloth-style entry points") and the modules:
loading.py (checkpoint -> NF4 tensor by tensor), checkpointing.py (checkpointing
with CPU offload), inference.py (exactly reversible merge for inference),
vision.py (what the vision switches select), models.py (the two classes).
"""

from .checkpointing import enable_checkpointing, offloaded_checkpoint
from .inference import for_inference, for_training
from .loading import load_quantized
from .models import UNSLOTH_TARGETS, FastLanguageModel, FastVisionModel
from .vision import select_linears, towers

__all__ = [
    "UNSLOTH_TARGETS",
    "FastLanguageModel",
    "FastVisionModel",
    "enable_checkpointing",
    "for_inference",
    "for_training",
    "load_quantized",
    "offloaded_checkpoint",
    "select_linears",
    "towers",
]
