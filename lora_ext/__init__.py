"""lora_ext: fused Low-Rank Adaptation (LoRA) ops for PyTorch.

``import lora_ext`` never fails: without the compiled library (or with
``LORA_EXT_DISABLE_EXTENSION=1``) every op runs on the pure-PyTorch fallback,
which computes the same function at the same rounding points.
"""

from . import integrations
from ._loader import build_info, extension_loaded
from .config import LoraConfig
from .io import load_adapter, save_adapter
from .layers import LoraEmbedding, LoraLinear
from .model import (
    active_adapter,
    active_adapters,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from .nf4 import NF4Weight, dequantize_nf4, lora_linear_nf4, quantize_nf4
from .ops import STRATEGIES, dropout_mask, lora_linear, merge_, merged_weight, strategy_plan, unmerge_
from .qlora import LinearNF4, LoraLinearNF4, memory_report, quantize_model

__version__ = "0.1.0"

__all__ = [
    # fused ops (issue 2)
    "STRATEGIES",
    "build_info",
    "dropout_mask",
    "extension_loaded",
    "lora_linear",
    "merge_",
    "merged_weight",
    "strategy_plan",
    "unmerge_",
    # model API (issue 4)
    "LoraConfig",
    "LoraEmbedding",
    "LoraLinear",
    "active_adapter",
    "active_adapters",
    "delete_adapter",
    "disable_adapters",
    "inject_adapter",
    "integrations",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
    # QLoRA (issue 6)
    "LinearNF4",
    "LoraLinearNF4",
    "NF4Weight",
    "dequantize_nf4",
    "lora_linear_nf4",
    "memory_report",
    "quantize_model",
    "quantize_nf4",
]
