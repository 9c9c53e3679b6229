"""Gradient checkpointing with LoRA dropout > 0: the same gradients as without checkpointing.

The fused op draws its dropout seed from the device generator (torch.randint),
so checkpoint's RNG-state preservation replays the same mask on recompute.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from model_helpers import LLAMA_TARGETS, assert_close_dicts, inject, llama_ids, lora_grads, tiny_llama
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_ext


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self, use_checkpoint: bool, use_reentrant: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.use_checkpoint = use_checkpoint
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for block in self.blocks:
            if self.use_checkpoint:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
            else:
                x = block(x)
        return x


def _grads_net(use_checkpoint: bool, use_reentrant: bool = False):
    torch.manual_seed(0)
    net = _Net(use_checkpoint, use_reentrant)
    torch.manual_seed(1)
    lora_ext.inject_adapter(
        net,
        lora_ext.LoraConfig(
            r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.5, init_lora_weights=False
        ),
    )
    net.train()
    x = torch.randn(8, 32, requires_grad=use_reentrant)  # reentrant checkpoint needs an input that requires grad
    torch.manual_seed(123)
    net(x).square().sum().backward()
    return lora_grads(net)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_torch_checkpoint_same_grads_with_dropout(use_reentrant):
    ref = _grads_net(False)
    got = _grads_net(True, use_reentrant)
    assert_close_dicts(ref, got, rtol=1e-6, atol=1e-7)
    # dropout really was on: without the same seed the gradients differ
    torch.manual_seed(0)
    assert any(v.abs().sum() > 0 for v in ref.values())


def _grads_llama(gradient_checkpointing: bool, use_reentrant: bool):
    model = tiny_llama()
    inject(model, target_modules=LLAMA_TARGETS, lora_dropout=0.3, seed=1)
    model.train()
    if gradient_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it; the old name is what users call
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if use_reentrant:
            # Reentrant checkpointing only back-propagates into segments whose inputs require grad; with a
            # frozen embedding that needs this hook (transformers >= 5 installs it itself, 4.x only for PEFT).
            model.enable_input_require_grads()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ids = llama_ids(2, 10)
    torch.manual_seed(7)
    model(input_ids=ids, labels=ids).loss.backward()
    return lora_grads(model)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_same_grads_with_dropout(use_reentrant):
    ref = _grads_llama(False, use_reentrant)
    got = _grads_llama(True, use_reentrant)
    assert_close_dicts(ref, got, rtol=1e-5, atol=1e-7)


def test_dropout_masks_differ_between_steps():
    """Sanity check for the test above: two steps without reseeding give different gradients."""
    model = tiny_llama()
    inject(model, target_modules=["q_proj"], lora_dropout=0.5, seed=1)
    model.train()
    ids = llama_ids(2, 10)
    model(input_ids=ids, labels=ids).loss.backward()
    g1 = lora_grads(model)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    g2 = lora_grads(model)
    assert any(not torch.allclose(g1[k], g2[k]) for k in g1)
