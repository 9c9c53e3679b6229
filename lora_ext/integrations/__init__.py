"""Integrations with other libraries, imported lazily so ``import lora_ext`` needs none of them.

``lora_ext.integrations.peft.accelerate(peft_model)`` makes a PEFT LoRA model
use the fused ops (imports ``peft`` on first access);
``lora_ext.integrations.trainer`` makes ``transformers.Trainer`` save and resume
an injected model as adapters in PEFT's format.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["peft", "trainer"]


def __getattr__(name: str) -> ModuleType:
    if name in ("peft", "trainer"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
