"""LoRA layers (the module layer over the ops) and the table that maps base layer types to them."""

from .bnb import LoraLinear4bit
from .dispatch import LAYER_TABLE, LayerKind, kind_of
from .layers import LoraEmbedding, LoraLayer, LoraLinear, LoraLinearNF4, ModulesToSaveWrapper, lora_linear_multi

__all__ = [
    "LAYER_TABLE",
    "LayerKind",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraLinear4bit",
    "LoraLinearNF4",
    "ModulesToSaveWrapper",
    "kind_of",
    "lora_linear_multi",
]
