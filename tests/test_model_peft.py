"""Equivalence with Hugging Face PEFT: layout, outputs, gradients, adapter files both ways, accelerate()."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from model_helpers import (
    LLAMA_TARGETS,
    assert_close_dicts,
    llama_ids,
    lora_grads,
    peft_twin,
    randomize_lora,
    tiny_llama,
)

import lora_ext

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CASES = {
    "basic": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
    "rslora": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        rank_pattern={"down_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
        alpha_pattern={"v_proj": 3},
    ),
    "bias_lora_only": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"),
    "bias_all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    "layers_to_transform": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
    "embeddings": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "all_linear": dict(r=4, lora_alpha=16, target_modules="all-linear"),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*\.(q|v)_proj"),
    "dropout_eval": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.3),
}


def _base(case: str):
    return tiny_llama(attention_bias=case.startswith("bias"))


def _pair(case: str):
    """(ours, PEFT) on the same base with the same random (non-zero) adapter weights."""
    kwargs = CASES[case]
    base = _base(case)
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_lora(ours, seed=1)
    pm = peft_twin(base, dict(init_lora_weights=False, **kwargs), ours=ours)
    return base, ours, pm


def _loss(logits):
    return (logits.float() ** 2).mean()


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_grads_match_peft(case):
    _, ours, pm = _pair(case)
    # same parameter layout and the same trainable set
    assert set(ours.state_dict()) == set(pm.base_model.model.state_dict())
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    assert ours_trainable == peft_trainable
    ids = llama_ids()
    y_ours = ours(ids).logits
    y_peft = pm(input_ids=ids).logits
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    _loss(y_ours).backward()
    _loss(y_peft).backward()
    assert_close_dicts(lora_grads(ours), lora_grads(pm), rtol=1e-4, atol=1e-6)


def test_bf16_base_matches_peft_within_rounding():
    base = tiny_llama(dtype=torch.bfloat16)
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(
        ours, lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    )
    randomize_lora(ours, seed=1)
    pm = peft_twin(base, dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False), ours=ours)
    # both keep fp32 adapters on a bf16 base (PEFT's autocast_adapter_dtype)
    assert ours.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ids = llama_ids()
    ref64 = copy.deepcopy(ours).double()
    with torch.no_grad():
        y64 = ref64(ids).logits
        err_ours = (ours(ids).logits.double() - y64).abs().max().item()
        err_peft = (pm(input_ids=ids).logits.double() - y64).abs().max().item()
    assert err_ours <= 2 * err_peft + 1e-2, (err_ours, err_peft)


# ------------------------------------------------------------------------ files


@pytest.mark.parametrize("case", ["basic", "patterns", "embeddings", "modules_to_save", "bias_lora_only", "all_linear"])
def test_our_file_loads_in_peft(case, tmp_path):
    base, ours, _ = _pair(case)
    lora_ext.save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors")))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(k.endswith(".lora_A.weight") or k.endswith(".lora_embedding_A") for k in keys)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ids = llama_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["basic", "patterns", "embeddings", "modules_to_save", "bias_lora_only", "rslora"])
def test_peft_file_loads_in_ours(case, tmp_path):
    base, _, pm = _pair(case)
    pm.save_pretrained(str(tmp_path))
    ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    ids = llama_ids()
    torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # PEFT's default: loaded adapters are not trainable
    assert lora_ext.trainable_parameters(ours)[0] == 0
    trainable = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    assert lora_ext.trainable_parameters(trainable)[0] > 0


def test_same_file_keys_as_peft(tmp_path):
    _, ours, pm = _pair("modules_to_save")
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "peft"))
    a = safetensors_torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_round_trip_ours_to_ours_two_adapters(tmp_path):
    base, ours, _ = _pair("basic")
    lora_ext.save_adapter(ours, str(tmp_path / "a"))
    other = copy.deepcopy(base)
    lora_ext.inject_adapter(
        other, lora_ext.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    lora_ext.save_adapter(other, str(tmp_path / "b"))
    model = copy.deepcopy(base)
    lora_ext.load_adapter(model, str(tmp_path / "a"), "a")
    lora_ext.load_adapter(model, str(tmp_path / "b"), "b")
    ids = llama_ids()
    assert lora_ext.active_adapter(model) == "a"
    torch.testing.assert_close(model(ids).logits, ours(ids).logits)
    lora_ext.set_adapter(model, "b")
    torch.testing.assert_close(model(ids).logits, other(ids).logits)


def test_merge_and_unload_matches_peft():
    _, ours, pm = _pair("embeddings")
    ids = llama_ids()
    merged_ours = lora_ext.merge_and_unload(ours)
    merged_peft = pm.merge_and_unload()
    torch.testing.assert_close(merged_ours(ids).logits, merged_peft(ids).logits, rtol=1e-5, atol=1e-5)
    assert set(merged_ours.state_dict()) == set(merged_peft.state_dict())


# ------------------------------------------------------------------- accelerate


def _spy_fused(monkeypatch):
    from lora_ext.nn import layers

    calls = []
    real = layers.ops.lora_linear

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(layers.ops, "lora_linear", spy)
    return calls


@pytest.mark.parametrize("case", ["basic", "rslora", "patterns", "modules_to_save", "embeddings"])
def test_accelerate_keeps_outputs_grads_and_names(case, monkeypatch):
    from lora_ext.integrations.peft import FusedLoraLinear, accelerate

    _, _, pm = _pair(case)
    ids = llama_ids()
    ref = copy.deepcopy(pm)
    names_before = [n for n, _ in pm.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # supported features: no warning
        assert accelerate(pm) is pm
    assert [n for n, _ in pm.named_parameters()] == names_before
    assert any(isinstance(m, FusedLoraLinear) for m in pm.modules())
    calls = _spy_fused(monkeypatch)
    y = pm(input_ids=ids).logits
    assert calls, "the fused op was not used"
    y_ref = ref(input_ids=ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    _loss(y).backward()
    _loss(y_ref).backward()
    assert_close_dicts(lora_grads(pm), lora_grads(ref), rtol=1e-4, atol=1e-6)


def test_accelerate_train_mode_dropout_and_save_load(tmp_path):
    from lora_ext.integrations.peft import accelerate

    base, _, pm = _pair("dropout_eval")
    accelerate(pm)
    pm.train()
    ids = llama_ids()
    torch.manual_seed(0)
    y1 = pm(input_ids=ids).logits
    torch.manual_seed(0)
    y2 = pm(input_ids=ids).logits
    torch.testing.assert_close(y1, y2)  # dropout seeded by torch.manual_seed
    pm.eval()
    # PEFT's own merge/unmerge and save_pretrained still work on the accelerated model
    y = pm(input_ids=ids).logits
    pm.merge_adapter()
    torch.testing.assert_close(pm(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    pm.save_pretrained(str(tmp_path))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(again(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
