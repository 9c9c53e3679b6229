"""inject_adapter target matching, freezing, several adapters, set/delete/disable, modules_to_save."""

from __future__ import annotations

import pytest
import torch
from model_helpers import LLAMA_TARGETS, inject, llama_ids, tiny_llama
from torch import nn

import lora_ext
from lora_ext.nn import ModulesToSaveWrapper


def _lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (lora_ext.LoraLinear, lora_ext.LoraEmbedding)))


def test_list_targets_wrap_and_freeze():
    model = tiny_llama()
    out = inject(model, target_modules=["q_proj", "v_proj"])
    assert out is model and isinstance(model, nn.Module)
    assert _lora_names(model) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert lora_ext.active_adapter(model) == "default"
    t, total = lora_ext.trainable_parameters(model)
    assert t == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert total == sum(p.numel() for p in model.parameters())


def test_embed_tokens_and_lm_head_targets():
    model = tiny_llama()
    inject(model, target_modules=["embed_tokens", "lm_head", "q_proj"])
    assert isinstance(model.model.embed_tokens, lora_ext.LoraEmbedding)
    assert isinstance(model.lm_head, lora_ext.LoraLinear)
    # HF helpers still find the layers
    assert model.get_input_embeddings() is model.model.embed_tokens
    out = model(llama_ids()).logits
    assert out.shape == (2, 12, 128)


def test_regex_target():
    model = tiny_llama()
    inject(model, target_modules=r".*layers\.1\.mlp\.(up|down)_proj")
    assert _lora_names(model) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_all_linear_excludes_output_head():
    model = tiny_llama()
    inject(model, target_modules="all-linear")
    names = _lora_names(model)
    assert "lm_head" not in names
    assert len(names) == 2 * 7
    cfg = lora_ext.model.adapter_config(model)
    assert sorted(cfg.target_modules) == names  # resolved, as PEFT saves it


def test_layers_to_transform_and_rank_alpha_pattern():
    model = tiny_llama()
    inject(
        model,
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[1],
        r=4,
        lora_alpha=8,
        rank_pattern={"down_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    assert _lora_names(model) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    down = model.model.layers[1].mlp.down_proj
    q = model.model.layers[1].self_attn.q_proj
    assert down.r["default"] == 2 and down.scaling["default"] == 8 / 2
    assert q.r["default"] == 4 and q.scaling["default"] == 3 / 4


def test_second_adapter_set_delete():
    model = tiny_llama()
    ids = llama_ids()
    base_out = model(ids).logits
    inject(model, "a", seed=1)
    out_a = model(ids).logits
    inject(model, "b", seed=2, target_modules=["q_proj", "lm_head"])  # adds lm_head too
    assert lora_ext.active_adapter(model) == "a"  # a new adapter is not activated (PEFT)
    torch.testing.assert_close(model(ids).logits, out_a)
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapters == ["a", "b"] and model.lm_head.adapters == ["b"]
    assert not q.lora_A["b"].weight.requires_grad

    lora_ext.set_adapter(model, "b")
    out_b = model(ids).logits
    assert not torch.allclose(out_b, out_a)
    assert q.lora_A["b"].weight.requires_grad and not q.lora_A["a"].weight.requires_grad

    x = torch.randn(3, 64)
    y_b = q(x)
    lora_ext.set_adapter(model, ["a", "b"])
    assert lora_ext.active_adapter(model) == ["a", "b"]
    y_base = q.base_layer(x)
    lora_ext.set_adapter(model, "a")
    y_a = q(x)
    lora_ext.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(q(x) - y_base, (y_a - y_base) + (y_b - y_base), rtol=1e-4, atol=1e-5)

    lora_ext.delete_adapter(model, "b")
    assert lora_ext.active_adapter(model) == "a"
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, lora_ext.LoraLinear)
    torch.testing.assert_close(model(ids).logits, out_a)
    lora_ext.delete_adapter(model, "a")
    assert _lora_names(model) == [] and not hasattr(model, "_lora_ext_state")
    torch.testing.assert_close(model(ids).logits, base_out)


def test_disable_adapters_context():
    model = tiny_llama()
    ids = llama_ids()
    base_out = model(ids).logits
    inject(model)
    lora_out = model(ids).logits
    with lora_ext.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_out)
    torch.testing.assert_close(model(ids).logits, lora_out)
    lora_ext.merge_adapter(model)
    with lora_ext.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_out, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for _, layer in lora_ext.model.lora_layers(model))
    torch.testing.assert_close(model(ids).logits, lora_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError), lora_ext.disable_adapters(model):  # restored on exceptions too
        raise RuntimeError("boom")
    assert not any(layer.disabled for _, layer in lora_ext.model.lora_layers(model))


def test_modules_to_save_trains_a_copy():
    model = tiny_llama()
    ids = llama_ids()
    inject(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert isinstance(model.lm_head, ModulesToSaveWrapper)
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not model.lm_head.original_module.weight.requires_grad
    assert model.lm_head.weight is model.lm_head.modules_to_save["default"].weight  # attribute passthrough
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(2)
    out = model(ids).logits
    with lora_ext.disable_adapters(model):
        assert not torch.allclose(model(ids).logits, out)
    merged = lora_ext.merge_and_unload(model)
    assert isinstance(merged.lm_head, nn.Linear)
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_bias_options():
    model = tiny_llama(attention_bias=True)
    inject(model, target_modules=["q_proj"], bias="lora_only")
    q = model.model.layers[0].self_attn.q_proj
    assert q.base_layer.bias.requires_grad
    assert not model.model.layers[0].self_attn.k_proj.bias.requires_grad
    model2 = tiny_llama(attention_bias=True)
    inject(model2, target_modules=["q_proj"], bias="all")
    assert model2.model.layers[0].self_attn.k_proj.bias.requires_grad


def test_print_trainable_parameters(capsys):
    model = tiny_llama()
    inject(model, target_modules=["q_proj"])
    lora_ext.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    t, total = lora_ext.trainable_parameters(model)
    assert line == f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}"


def test_trains_with_plain_loop():
    model = tiny_llama()
    inject(model, target_modules=LLAMA_TARGETS, lora_dropout=0.1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = llama_ids(4, 16)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hf_trainer_one_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny_llama()
    inject(model, target_modules=["q_proj", "v_proj"])
    ids = llama_ids(8, 8)
    ds = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=1e-2,
    )
    before = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().clone()
    transformers.Trainer(model=model, args=args, train_dataset=ds).train()
    after = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert not torch.equal(before, after)
    assert not model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
