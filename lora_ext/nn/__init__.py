"""LoRA layers (the module layer over the ops) and the table that maps base layer types to them."""

from .bnb import LoraLinear4bit
from .conv import LoraConv1D, LoraConv1d, LoraConv2d, LoraConv3d, LoraConvNd
from .dispatch import LAYER_TABLE, LayerKind, kind_of
from .dora import LoraLinearDora
from .layers import LoraEmbedding, LoraLayer, LoraLinear, LoraLinearNF4, ModulesToSaveWrapper, lora_linear_multi

__all__ = [
    "LAYER_TABLE",
    "LayerKind",
    "LoraConv1D",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraConvNd",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraLinear4bit",
    "LoraLinearDora",
    "LoraLinearNF4",
    "ModulesToSaveWrapper",
    "kind_of",
    "lora_linear_multi",
]
