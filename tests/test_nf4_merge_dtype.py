"""QLoRA merge_and_unload on lora_ext's own LinearNF4 path: the merged layers come back in the layer's
original dtype (quant_dtype), so the model runs in its own dtype; merged output equals unmerged within
the compute dtype's rounding (tolerance rule of docs/design.md §4 against float64).

The bitsandbytes Linear4bit path has the same tests in tests/test_bnb_lora.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ATOL, max_err
from model_helpers import inject, llama_ids, randomize_lora, tiny_llama
from torch import nn

import lora_ext
from lora_ext import LinearNF4, LoraLinearNF4


def _float64_merged_reference(model):
    """A float64 copy whose LoRA layers are dense ``dequantize(W) + s·BA``."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, LoraLinearNF4):
            w = m.base_layer.dequantize(torch.float32).double()
            for n in m.active_adapters:
                w = w + m.scaling[n] * m.lora_B[n].weight.double() @ m.lora_A[n].weight.double()
            dense = nn.Linear(m.in_features, m.out_features, bias=m.base_layer.bias is not None, dtype=torch.float64)
            with torch.no_grad():
                dense.weight.copy_(w)
                if m.base_layer.bias is not None:
                    dense.bias.copy_(m.base_layer.bias.double())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, dense)
    return ref.double()


@pytest.mark.parametrize(
    "model_dtype,compute_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["fp32-model-bf16-compute", "fp32-fp32", "bf16-model-fp32-compute"],
)
def test_merge_and_unload_returns_layers_in_the_original_dtype(model_dtype, compute_dtype):
    model = lora_ext.quantize_model(tiny_llama(dtype=model_dtype), compute_dtype=compute_dtype)
    assert all(m.quant_dtype == model_dtype for m in model.modules() if isinstance(m, LinearNF4))
    inject(model, r=4, lora_alpha=8)
    randomize_lora(model, std=0.2)
    ids = llama_ids(seed=7)
    ref64 = _float64_merged_reference(model)
    with torch.no_grad():
        y_unmerged = model(ids).logits
        y64 = ref64(ids).logits
    lora_ext.merge_and_unload(model)
    assert not any(isinstance(m, (LinearNF4, LoraLinearNF4)) for m in model.modules())
    q = model.model.layers[1].mlp.down_proj
    assert type(q) is nn.Linear and q.weight.dtype == model_dtype
    assert {p.dtype for p in model.parameters()} == {model_dtype}
    with torch.no_grad():
        y_merged = model(ids).logits  # runs: the merged layers have the model's dtype
    assert y_merged.dtype == y_unmerged.dtype == model_dtype
    err_merged, err_unmerged = max_err(y_merged, y64), max_err(y_unmerged, y64)
    bound = 2 * err_unmerged + ATOL[model_dtype] * max(1.0, y64.abs().max().item())
    assert err_merged <= bound, f"merged error {err_merged:.3e} > 2 x unmerged {err_unmerged:.3e} + atol"
    if model_dtype == compute_dtype == torch.float32:
        assert err_merged <= 1e-4 * y64.abs().max().item()


def test_unmerge_puts_the_nf4_layer_back():
    model = lora_ext.quantize_model(tiny_llama(), compute_dtype=torch.bfloat16)
    inject(model, r=2, lora_alpha=4)
    randomize_lora(model, std=0.2)
    layer = model.model.layers[0].self_attn.v_proj
    nf4 = layer.base_layer
    codes = nf4.weight.detach().clone()
    ids = llama_ids(seed=8)
    with torch.no_grad():
        y0 = model(ids).logits
        lora_ext.merge_adapter(model)
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
        lora_ext.unmerge_adapter(model)
        assert layer.base_layer is nf4 and torch.equal(nf4.weight, codes)
        assert torch.equal(model(ids).logits, y0)
