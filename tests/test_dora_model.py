"""DoRA at the model level, against PEFT itself: outputs and gradients (A, B, magnitude), train-mode
dropout with the same mask, adapter files both ways, accelerate() of PEFT DoRA layers, merging,
the ||w||^2 cache and the refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from model_helpers import (
    LLAMA_TARGETS,
    assert_close_dicts,
    assert_unchanged,
    llama_ids,
    lora_grads,
    peft_twin,
    randomize_lora,
    snapshot,
    tiny_llama,
)
from torch import nn

import lora_ext
from lora_ext.nn.dora import LoraLinearDora

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

KW = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)


def _loss(logits):
    return (logits.float() ** 2).mean()


def _pair(bias: bool = False, **overrides):
    """(base, ours, PEFT) with the same random adapter weights (B and the magnitudes not at their init)."""
    kwargs = {**KW, **overrides}
    base = tiny_llama(attention_bias=bias)
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_lora(ours, seed=1)
    with torch.no_grad():  # magnitudes near their natural scale (randomize_lora made them ~0.1)
        for name, p in ours.named_parameters():
            if "lora_magnitude_vector" in name:
                p.add_(1.0)
    pm = peft_twin(base, dict(init_lora_weights=False, **kwargs), ours=ours)
    return base, ours, pm


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_outputs_and_grads_equal_peft(bias):
    _, ours, pm = _pair(bias)
    assert set(ours.state_dict()) == set(pm.base_model.model.state_dict())
    assert any(isinstance(m, LoraLinearDora) for m in ours.modules())
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    assert ours_trainable == peft_trainable and any("magnitude" in n for n in ours_trainable)
    ids = llama_ids()
    y_ours, y_peft = ours(ids).logits, pm(input_ids=ids).logits
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    _loss(y_ours).backward()
    _loss(y_peft).backward()
    grads = lora_grads(ours)
    assert any("lora_magnitude_vector" in k for k in grads)
    assert_close_dicts(grads, lora_grads(pm), rtol=1e-4, atol=1e-6)


class _HashDropout(nn.Module):
    """PEFT's dropout slot filled with lora_ext's mask: draws the seed exactly as the fused op does."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
        keep = lora_ext.dropout_mask(seed, x.numel() // x.shape[-1], x.shape[-1], self.p).view(x.shape)
        return x * keep / (1.0 - self.p)


def test_train_mode_dropout_equals_peft_with_the_same_mask():
    _, ours, pm = _pair(bias=True, lora_dropout=0.25)
    for module in pm.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name in list(module.lora_dropout):
                module.lora_dropout[name] = _HashDropout(0.25)
    ours.train()
    pm.train()
    ids = llama_ids()
    torch.manual_seed(5)
    y_ours = ours(ids).logits
    torch.manual_seed(5)
    y_peft = pm(input_ids=ids).logits
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    _loss(y_ours).backward()
    _loss(y_peft).backward()
    assert_close_dicts(lora_grads(ours), lora_grads(pm), rtol=1e-4, atol=1e-6)
    # dropout is on: eval mode gives a different output
    ours.eval()
    with torch.no_grad():
        assert (ours(ids).logits - y_ours).abs().max() > 1e-4


def test_fresh_dora_adapter_equals_peft_init_and_keeps_outputs():
    base = tiny_llama()
    ours = copy.deepcopy(base)
    torch.manual_seed(3)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**KW))
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KW))
    assert_close_dicts(
        {k: v for k, v in ours.state_dict().items()},
        {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()},
        rtol=1e-6,
        atol=1e-6,
    )
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_files_both_ways(tmp_path):
    base, ours, pm = _pair(bias=False)
    ids = llama_ids()
    with torch.no_grad():
        y = ours(ids).logits
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert loaded.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    pm.save_pretrained(str(tmp_path / "peft"))
    again = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert lora_ext.model.inject.adapter_config(again).use_dora
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, y, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file, save_file

    k_ours = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    k_peft = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert k_ours == k_peft and any(k.endswith(".lora_magnitude_vector") for k in k_ours)
    # PEFT also reads (and older files hold) "<module>.lora_magnitude_vector.weight": so do we
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    renamed = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "peft" / "adapter_model.safetensors"))
    third = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(third(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_accelerate_runs_peft_dora_layers_fused():
    from lora_ext.integrations.peft import FusedLoraLinear, accelerate

    _, _, pm = _pair(bias=True)
    ref = copy.deepcopy(pm)
    ids = llama_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "keeps PEFT's forward" warning any more
        accelerate(pm)
    fused = [m for m in pm.modules() if isinstance(m, FusedLoraLinear)]
    assert len(fused) == 2 * len(LLAMA_TARGETS)
    calls = []
    real = lora_ext.ops.dora_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import lora_ext.integrations.peft as integ

    integ.ops.dora_linear = spy
    try:
        y = pm(input_ids=ids).logits
    finally:
        integ.ops.dora_linear = real
    assert len(calls) == len(fused)
    y_ref = ref(input_ids=ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    _loss(y).backward()
    _loss(y_ref).backward()
    assert_close_dicts(lora_grads(pm), lora_grads(ref), rtol=1e-4, atol=1e-6)


def test_merge_unmerge_and_merge_and_unload_equal_peft():
    _, ours, pm = _pair(bias=True)
    ids = llama_ids()
    snap = snapshot(ours)
    with torch.no_grad():
        y = ours(ids).logits
        lora_ext.merge_adapter(ours)
        pm.merge_adapter()
        y_merged = ours(ids).logits
        torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_merged, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        for name, layer in lora_ext.model.inject.lora_layers(ours):
            w_peft = pm.base_model.model.get_submodule(name).base_layer.weight
            torch.testing.assert_close(layer.base_layer.weight, w_peft, rtol=1e-6, atol=1e-6)
        lora_ext.unmerge_adapter(ours)
        torch.testing.assert_close(ours(ids).logits, y, rtol=1e-5, atol=1e-5)
        for k, v in snap["tensors"].items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)
        merged = lora_ext.merge_and_unload(ours)
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        pm.unmerge_adapter()
        plain = pm.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    _, ours, _ = _pair()
    layer = ours.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[0] = float("inf")
    snap = snapshot(ours)
    with pytest.raises(ValueError, match="non-finite"):
        lora_ext.merge_adapter(ours, safe_merge=True)
    assert_unchanged(ours, snap)


def test_weight_sq_norm_cache_follows_the_base_weight():
    _, ours, _ = _pair()
    layer = ours.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y1 = layer(x)
        key = layer._sq_norm_cache[0]
        assert torch.equal(layer(x), y1) and layer._sq_norm_cache[0] == key  # served from the cache
        layer.base_layer.weight.mul_(1.5)  # in place: same storage, new version
        y2 = layer(x)
        assert layer._sq_norm_cache[0] != key
        fresh = copy.deepcopy(layer)
        fresh._sq_norm_cache = None
        torch.testing.assert_close(y2, fresh(x), rtol=0, atol=0)
        assert (y2 - y1).abs().max() > 1e-3


def test_two_active_adapters_follow_peft_order():
    base, ours, pm = _pair()
    torch.manual_seed(9)
    plain_kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**plain_kw), "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("plain", peft.LoraConfig(**plain_kw))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".plain." in name:
                pm.base_model.model.get_parameter(name).copy_(p)
    lora_ext.set_adapter(ours, ["default", "plain"])
    pm.base_model.set_adapter(["default", "plain"])
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_dora_on_an_embedding_is_refused_before_any_change():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="use_dora=True is implemented for nn.Linear layers only.*embed_tokens"):
        lora_ext.inject_adapter(
            model, lora_ext.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], use_dora=True)
        )
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        lora_ext.LoraConfig(r=2, target_modules=["q_proj"], use_dora="yes")


def test_bf16_base_within_the_rule_of_peft():
    base = tiny_llama(dtype=torch.bfloat16)
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(init_lora_weights=False, **KW))
    randomize_lora(ours, seed=1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_magnitude_vector" in name:
                p.add_(1.0)
    pm = peft_twin(base, dict(init_lora_weights=False, **KW), ours=ours)
    ids = llama_ids()
    ref64 = copy.deepcopy(ours).double()
    with torch.no_grad():
        y64 = ref64(ids).logits
        err_ours = (ours(ids).logits.double() - y64).abs().max().item()
        err_peft = (pm(input_ids=ids).logits.double() - y64).abs().max().item()
    assert err_ours <= 2 * err_peft + 1e-2, (err_ours, err_peft)


def test_torch_compile_fullgraph_of_a_dora_model():
    _, ours, _ = _pair()
    ids = llama_ids()
    y = ours(ids).logits
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    y_c = compiled(ids).logits
    torch.testing.assert_close(y_c, y, rtol=1e-6, atol=1e-6)
    _loss(y_c).backward()
    assert ours.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.grad.abs().sum() > 0
