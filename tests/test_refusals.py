"""Arguments that would be ignored or converted silently raise instead (never a silent wrong answer)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import inject, llama_ids, tiny_llama

import lora_ext


def test_adapter_names_is_honoured_or_refused_not_ignored():
    """Mixed-adapter batches (tests/test_mixed_model.py): an unknown name raises instead of being ignored."""
    model = inject(tiny_llama())
    ids = llama_ids()
    with pytest.raises(ValueError, match="unknown adapter"):
        model(ids, adapter_names=["default", "other"])
    model(ids, adapter_names=["default", "__base__"])
    lora_ext.unload(model)
    assert not model._forward_pre_hooks and not model._forward_hooks  # unload removes the hooks


def test_input_dtype_must_match_the_layer_outside_autocast():
    """nn.Linear's rule: an int64 or fp64 input to an fp32 LoRA layer raises instead of being converted."""
    layer = lora_ext.LoraLinear(torch.nn.Linear(8, 4), "default", r=2)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        layer(torch.ones(3, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.ones(3, 8)).dtype == torch.bfloat16  # autocast decides the dtype, as for nn.Linear


def test_merge_strategy_with_dropout_is_refused():
    x, w, a, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="strategy='merge' cannot apply dropout"):
        lora_ext.lora_linear(x, w, a, b, 1.0, dropout_p=0.1, strategy="merge")
    lora_ext.lora_linear(x, w, a, b, 1.0, dropout_p=0.1, strategy="shrink_expand")


def test_strategy_for_an_nf4_base_is_refused_unless_auto():
    qw = lora_ext.quantize_nf4(torch.randn(16, 64), 64)
    x, a, b = torch.randn(3, 64), torch.randn(2, 64), torch.randn(16, 2)
    with pytest.raises(ValueError, match="single strategy"):
        lora_ext.lora_linear(x, qw, a, b, 1.0, strategy="merge")
    with pytest.raises(ValueError, match="strategy must be one of"):
        lora_ext.lora_linear(x, qw, a, b, 1.0, strategy="fast")
    lora_ext.lora_linear(x, qw, a, b, 1.0, strategy="auto")
