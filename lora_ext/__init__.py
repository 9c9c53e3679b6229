"""lora_ext: fused Low-Rank Adaptation (LoRA) ops for PyTorch.

``import lora_ext`` never fails: without the compiled library (or with
``LORA_EXT_DISABLE_EXTENSION=1``) every op runs on the pure-PyTorch fallback,
which computes the same function at the same rounding points.
"""

from ._loader import build_info, extension_loaded
from .ops import STRATEGIES, dropout_mask, lora_linear, merge_, merged_weight, strategy_plan, unmerge_

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "build_info",
    "dropout_mask",
    "extension_loaded",
    "lora_linear",
    "merge_",
    "merged_weight",
    "strategy_plan",
    "unmerge_",
]
