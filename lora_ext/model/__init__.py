"""The model API: LoraConfig, injecting adapters into any nn.Module, their lifecycle, PEFT-format files."""

from .config import LoraConfig
from .inject import (
    active_adapter,
    active_adapters,
    adapter_config,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from .io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .weighted import add_weighted_adapter

__all__ = [
    "LoraConfig",
    "active_adapter",
    "active_adapters",
    "add_weighted_adapter",
    "adapter_config",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "inject_adapter",
    "load_adapter",
    "lora_layers",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]
