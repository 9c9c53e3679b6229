"""merge_adapter / unmerge_adapter exact by default: bit-exact weights, adapted outputs, state_dict, memory."""

from __future__ import annotations

import pytest
import torch
from model_helpers import LLAMA_TARGETS, inject, llama_ids, randomize_lora, tiny_llama

import lora_ext
from lora_ext.model import lora_layers

TARGETS = [*LLAMA_TARGETS, "embed_tokens", "lm_head"]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def weights(model) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}


def same_bits(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n].view(BITS[a[n].dtype]), b[n].view(BITS[b[n].dtype])) for n in a)


def two_adapter_llama(dtype, std):
    """Tiny Llama (W std 0.02) with adapters "a" and "b", r=8, s=1: std=0.08 gives |ΔW| ≈ |W|."""
    model = tiny_llama(dtype=dtype)
    inject(model, "a", target_modules=TARGETS)
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=TARGETS, init_lora_weights=False), "b")
    randomize_lora(model, std=std)
    return model


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_switching_merged_adapters_is_bit_exact(dtype):
    model = two_adapter_llama(dtype, std=0.08)
    w0 = weights(model)
    ids = llama_ids()
    outs, plain_err = {}, {}
    for name in ("a", "b"):
        lora_ext.set_adapter(model, name)
        outs[name] = model(ids).logits.float()
        # plain merges: the merged model's distance to the unmerged one, and the drift after unmerging
        lora_ext.merge_adapter(model, exact=False)
        plain_err[name] = _rel(model(ids).logits.float(), outs[name])
        lora_ext.unmerge_adapter(model)
        assert not same_bits(weights(model), w0)
        with torch.no_grad():
            for n, layer in lora_layers(model):
                layer.base_layer.weight.copy_(w0[n])
    for cycle in range(100):
        for name in ("a", "b"):
            lora_ext.set_adapter(model, name)
            lora_ext.merge_adapter(model)
            if cycle in (0, 99):
                # the merged model computes the adapted function (as closely as a plain merge in this dtype)
                assert _rel(model(ids).logits.float(), outs[name]) <= 1.5 * plain_err[name] + 1e-3
                report = lora_ext.memory_report(model)
                assert report["merge_record_bytes"] > 0
                assert report["merge_record_fraction"] < 1.2
            lora_ext.unmerge_adapter(model)
            assert lora_ext.memory_report(model)["merge_record_bytes"] == 0
    assert same_bits(weights(model), w0)


def test_both_adapters_merged_and_disable_adapters():
    model = two_adapter_llama(torch.bfloat16, std=0.08)
    w0 = weights(model)
    ids = llama_ids()
    lora_ext.set_adapter(model, ["a", "b"])
    ref = model(ids).logits.float()
    lora_ext.merge_adapter(model, exact=False)
    plain_err = _rel(model(ids).logits.float(), ref)
    lora_ext.unmerge_adapter(model)
    with torch.no_grad():
        for n, layer in lora_layers(model):
            layer.base_layer.weight.copy_(w0[n])
    lora_ext.merge_adapter(model)
    assert _rel(model(ids).logits.float(), ref) <= 1.5 * plain_err + 1e-3
    with lora_ext.disable_adapters(model):
        assert same_bits(weights(model), w0)
    assert all(layer.merged and layer._merge_records for _, layer in lora_layers(model))
    lora_ext.unmerge_adapter(model)
    assert same_bits(weights(model), w0)


def test_safe_merge_refuses_non_finite_and_restores_bits():
    model = two_adapter_llama(torch.bfloat16, std=0.08)
    w0 = weights(model)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B["a"].weight[0, 0] = float("inf")
    lora_ext.set_adapter(model, "a")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and same_bits(weights(model), w0)


def test_state_dict_round_trip_keeps_the_records():
    model = two_adapter_llama(torch.bfloat16, std=0.08)
    w0 = weights(model)
    lora_ext.set_adapter(model, "b")
    lora_ext.merge_adapter(model)
    merged = weights(model)
    sd = model.state_dict()
    assert any(".merge_record.b." in k for k in sd)
    fresh = two_adapter_llama(torch.bfloat16, std=0.08)
    lora_ext.set_adapter(fresh, "b")
    fresh.load_state_dict(sd)  # strict: every key consumed
    assert same_bits(weights(fresh), merged)
    assert all(layer.merged_adapters == ["b"] for _, layer in lora_layers(fresh))
    lora_ext.unmerge_adapter(fresh)
    assert same_bits(weights(fresh), w0)
    # an unmerged model's state_dict has no record keys
    assert not any(".merge_record." in k for k in fresh.state_dict())


def test_loading_plain_weights_into_an_exactly_merged_model_is_refused():
    model = two_adapter_llama(torch.bfloat16, std=0.08)
    plain_sd = {k: v.clone() for k, v in model.state_dict().items()}
    lora_ext.merge_adapter(model)
    with pytest.raises(ValueError, match="merged exactly"):
        model.load_state_dict(plain_sd)
    lora_ext.unmerge_adapter(model)
    model.load_state_dict(plain_sd)


def test_exact_false_keeps_no_record_and_merge_and_unload_keeps_none():
    model = two_adapter_llama(torch.float32, std=0.08)
    lora_ext.merge_adapter(model, exact=False)
    assert all(not layer._merge_records for _, layer in lora_layers(model))
    assert lora_ext.memory_report(model)["merge_record_bytes"] == 0
    lora_ext.unmerge_adapter(model)
    plain = lora_ext.merge_and_unload(model)
    assert lora_ext.memory_report(plain)["merge_record_bytes"] == 0


def test_fp64_weights_merge_plainly():
    model = two_adapter_llama(torch.float64, std=0.08)
    lora_ext.merge_adapter(model)  # exact by default only where supported: fp64 merges without records
    assert all(layer.merged and not layer._merge_records for _, layer in lora_layers(model))
    lora_ext.unmerge_adapter(model)
