"""lora_ext: fused Low-Rank Adaptation (LoRA) ops for PyTorch.

``import lora_ext`` never fails: without the compiled library (or with
``LORA_EXT_DISABLE_EXTENSION=1``) every op runs on the pure-PyTorch fallback,
which computes the same function at the same rounding points.
"""

from . import (
    integrations,
    ops,  # loads the compiled library and registers every op, before .model builds on them
)
from .fast import FastLanguageModel, FastVisionModel
from .model import (
    LoraConfig,
    active_adapter,
    active_adapters,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from .nn import LoraEmbedding, LoraLinear, LoraLinear4bit, LoraLinearDora, LoraLinearNF4
from .ops import (
    STRATEGIES,
    MergeRecord,
    build_info,
    dora_linear,
    dora_weight_norm,
    dropout_mask,
    extension_loaded,
    lora_linear,
    lora_linear_mixed,
    lora_linear_nf4,
    merge_,
    merged_weight,
    strategy_plan,
    unmerge_,
)
from .quant.linear import LinearNF4, memory_report, quantize_model
from .quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .rank import rank_pattern_from_report, rank_report, suggest_lora_alpha, suggest_rank

__version__ = "0.1.0"

__all__ = [
    # fused ops
    "STRATEGIES",
    "MergeRecord",
    "build_info",
    "dora_linear",
    "dora_weight_norm",
    "dropout_mask",
    "extension_loaded",
    "lora_linear",
    "lora_linear_mixed",
    "merge_",
    "merged_weight",
    "ops",
    "strategy_plan",
    "unmerge_",
    # model API
    "LoraConfig",
    "LoraEmbedding",
    "LoraLinear",
    "LoraLinearDora",
    "active_adapter",
    "active_adapters",
    "add_weighted_adapter",
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
    # QLoRA
    "LinearNF4",
    "LoraLinear4bit",
    "LoraLinearNF4",
    "NF4Weight",
    "dequantize_nf4",
    "lora_linear_nf4",
    "memory_report",
    "quantize_model",
    "quantize_nf4",
    # Unsloth-style entry points and rank guidance
    "FastLanguageModel",
    "FastVisionModel",
    "rank_pattern_from_report",
    "rank_report",
    "suggest_lora_alpha",
    "suggest_rank",
]
