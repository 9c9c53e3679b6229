"""The op library: one registry (``_library``) for every op family, one validation
contract (``checks``), the pure-PyTorch kernels (``reference``) and the public
typed functions (``functional``).

Importing this package loads the compiled library (``_loader``) and registers
the dense (``dense``) and NF4 (``nf4``) op families with the dispatcher.
"""

from . import dense, nf4  # noqa: F401  (register the op families)
from ._library import fallback_dispatch_keys
from ._loader import build_info, extension_loaded
from .functional import (
    STRATEGIES,
    autocast_dtype_for,
    dropout_mask,
    lora_linear,
    lora_linear_nf4,
    merge_,
    merged_weight,
    strategy_plan,
    unmerge_,
)

__all__ = [
    "STRATEGIES",
    "autocast_dtype_for",
    "build_info",
    "dropout_mask",
    "extension_loaded",
    "fallback_dispatch_keys",
    "lora_linear",
    "lora_linear_nf4",
    "merge_",
    "merged_weight",
    "strategy_plan",
    "unmerge_",
]
