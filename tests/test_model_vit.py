"""A ViT built from a config: LoRA on attention and MLP Linear layers, classifier trained via modules_to_save."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import assert_close_dicts, lora_grads, peft_twin, randomize_lora, tiny_vit
from torch import nn

import lora_ext

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _vit_targets(model) -> list[str]:
    """The attention and MLP Linear names of this transformers version's ViT layers.

    transformers 5 calls them q_proj/k_proj/v_proj/o_proj/fc1/fc2, 4.x query/key/value/dense.
    """
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and "classifier" not in n}
    )


def _kwargs(model) -> dict:
    return dict(
        r=4, lora_alpha=8, target_modules=_vit_targets(model), modules_to_save=["classifier"], init_lora_weights=False
    )


def _images(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _pair():
    base = tiny_vit()
    kwargs = _kwargs(base)
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**kwargs))
    randomize_lora(ours, seed=1)
    pm = peft_twin(base, kwargs, ours=ours)
    return base, ours, pm


def test_vit_targets_attention_and_mlp():
    _, ours, _ = _pair()
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, lora_ext.LoraLinear))
    assert len(wrapped) == 2 * 6  # per layer: q, k, v, attention output, MLP in, MLP out
    assert all(".classifier" not in n for n in wrapped)
    assert ours.classifier.modules_to_save["default"].weight.requires_grad


def test_vit_matches_peft_outputs_and_grads():
    _, ours, pm = _pair()
    x = _images()
    labels = torch.tensor([0, 1, 2, 1])
    y_ours, y_peft = ours(pixel_values=x).logits, pm(pixel_values=x).logits
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(y_ours, labels).backward()
    torch.nn.functional.cross_entropy(y_peft, labels).backward()
    assert_close_dicts(lora_grads(ours), lora_grads(pm), rtol=1e-4, atol=1e-7)


def test_vit_train_merge_and_peft_file(tmp_path):
    peft = pytest.importorskip("peft")
    base, ours, _ = _pair()
    x, labels = _images(8), torch.tensor([0, 1, 2, 1, 0, 2, 1, 0])
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(ours(pixel_values=x).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    ours.eval()
    with torch.no_grad():
        ref = ours(pixel_values=x).logits
        lora_ext.save_adapter(ours, str(tmp_path))
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(loaded(pixel_values=x).logits, ref, rtol=1e-5, atol=1e-5)
        merged = lora_ext.merge_and_unload(ours)
        torch.testing.assert_close(merged(pixel_values=x).logits, ref, rtol=1e-5, atol=1e-5)
