"""Integrations with other libraries, imported lazily so ``import lora_ext`` needs none of them.

``lora_ext.integrations.peft.accelerate(peft_model)`` makes a PEFT LoRA model
use the fused ops (imports ``peft`` on first access).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["peft"]


def __getattr__(name: str) -> ModuleType:
    if name == "peft":
        return importlib.import_module(f"{__name__}.peft")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
