"""LoraLinear / LoraEmbedding used on their own: math, dtypes, dropout, fused dispatch, repr."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_ext


def _linear(k=24, n=20, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _ref_linear(layer: lora_ext.LoraLinear, x: torch.Tensor, names) -> torch.Tensor:
    """float64 reference of base + Σ s·(x Aᵀ) Bᵀ."""
    base = layer.base_layer
    y = F.linear(x.double(), base.weight.double(), None if base.bias is None else base.bias.double())
    for n in names:
        a, b = layer.lora_A[n].weight.double(), layer.lora_B[n].weight.double()
        y = y + layer.scaling[n] * (x.double() @ a.t() @ b.t())
    return y


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_reference_and_grads(bias):
    layer = lora_ext.LoraLinear(_linear(bias=bias), "default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 20)
    torch.testing.assert_close(y.double(), _ref_linear(layer, x, ["default"]), rtol=1e-5, atol=1e-5)
    # gradients against autograd of the plain formula
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    yr = layer.base_layer(xr) + (xr @ a.t() @ b.t()) * layer.scaling["default"]
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None or not layer.base_layer.weight.requires_grad


def test_fresh_adapter_is_identity_and_scale():
    base = _linear()
    x = torch.randn(4, 24)
    ref = base(x)
    layer = lora_ext.LoraLinear(base, "default", r=4, lora_alpha=16)
    assert layer.scaling["default"] == 4.0
    torch.testing.assert_close(layer(x), ref)  # B = 0 at init
    rs = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=16, use_rslora=True)
    assert rs.scaling["default"] == 8.0


def test_single_adapter_uses_one_fused_call(monkeypatch):
    layer = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=8, init_lora_weights=False)
    calls = []
    real = torch.ops.lora_ext.lora_linear

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.lora_ext, "lora_linear", spy)
    for x in (torch.randn(2, 24), torch.randn(3, 2, 24)):  # the direct call and the one behind the reshape
        calls.clear()
        layer(x)
        assert len(calls) == 1
        # the bias goes into the fused call (not added afterwards)
        assert calls[0][2] is layer.base_layer.bias


def test_dropout_only_in_training():
    layer = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(16, 24)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _ref_linear(layer, x, ["default"]), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    y2 = layer(x)
    torch.manual_seed(4)
    y3 = layer(x)
    assert torch.equal(y1, y2), "same seed must give the same dropout mask"
    assert not torch.allclose(y1, y3)
    # the base output is untouched by dropout: the difference to eval lies in the low-rank branch only
    layer.eval()
    base_only = layer.base_layer(x)
    lora_train = (y1 - base_only).detach()
    assert lora_train.abs().sum() > 0


def test_several_active_adapters_sum():
    layer = lora_ext.LoraLinear(_linear(), "a", r=4, lora_alpha=8, init_lora_weights=False)
    layer.add_adapter("b", 2, 3.0, init_lora_weights=False)
    x = torch.randn(5, 24)
    layer.set_active(("a", "b"))
    torch.testing.assert_close(layer(x).double(), _ref_linear(layer, x, ["a", "b"]), rtol=1e-5, atol=1e-5)
    layer.set_active(("b",))
    torch.testing.assert_close(layer(x).double(), _ref_linear(layer, x, ["b"]), rtol=1e-5, atol=1e-5)
    assert layer.lora_A["b"].weight.requires_grad and not layer.lora_A["a"].weight.requires_grad


def test_bf16_base_with_fp32_adapter_trains_in_fp32():
    base = _linear(dtype=torch.bfloat16)
    layer = lora_ext.LoraLinear(base, "default", r=4, lora_alpha=8, init_lora_weights=False, dtype=torch.float32)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    ref = _ref_linear(layer, x, ["default"])
    # the fused path is at least as accurate as PEFT's formula (base in bf16, LoRA in fp32, sum rounded)
    peft_style = (
        layer.base_layer(x)
        + (x.float() @ layer.lora_A["default"].weight.t() @ layer.lora_B["default"].weight.t())
        * layer.scaling["default"]
    ).to(torch.bfloat16)
    err_ours = (y.double() - ref).abs().max().item()
    err_peft = (peft_style.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_peft + 1e-3, (err_ours, err_peft)


def test_autocast_runs_in_autocast_dtype():
    layer = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _ref_linear(layer, x, ["default"]), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32


def test_merged_and_disabled_use_base_only():
    layer = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 24)
    y = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    layer._disable_adapters = True
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_extra_repr_and_weight_passthrough():
    layer = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=8, lora_dropout=0.1)
    text = repr(layer)
    for part in ("r=4", "alpha=8", "dropout=0.1", "active_adapter='default'", "merged=False"):
        assert part in text, text
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    layer.merge()
    assert "merged=True" in repr(layer)


# --------------------------------------------------------------------- Embedding


def _ref_embedding(layer: lora_ext.LoraEmbedding, ids, names):
    y = layer.base_layer.weight.double()[ids]
    for n in names:
        a, b = layer.lora_embedding_A[n].double(), layer.lora_embedding_B[n].double()
        y = y + layer.scaling[n] * (a.t()[ids] @ b.t())
    return y


def test_embedding_matches_peft_semantics_and_grads():
    torch.manual_seed(0)
    emb = nn.Embedding(30, 12, padding_idx=0)
    layer = lora_ext.LoraEmbedding(emb, "default", r=3, lora_alpha=6, init_lora_weights=False)
    assert layer.lora_embedding_A["default"].shape == (3, 30)
    assert layer.lora_embedding_B["default"].shape == (12, 3)
    ids = torch.tensor([[0, 5, 29], [7, 7, 1]])
    y = layer(ids)
    torch.testing.assert_close(y.double(), _ref_embedding(layer, ids, ["default"]), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    ga = layer.lora_embedding_A["default"].grad
    assert ga[:, 0].abs().sum() == 0, "padding_idx rows get no gradient (F.embedding semantics)"
    assert ga[:, 7].abs().sum() > 0


def test_embedding_default_init_is_identity_and_merge():
    torch.manual_seed(0)
    emb = nn.Embedding(30, 12)
    ids = torch.randint(0, 30, (4, 5))
    ref = emb(ids)
    layer = lora_ext.LoraEmbedding(emb, "default", r=3, lora_alpha=6)
    torch.testing.assert_close(layer(ids), ref)  # A = 0 at init
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    y = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, emb.weight, rtol=0, atol=1e-6)


def test_wrapping_wrong_type_is_an_error():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        lora_ext.LoraLinear(nn.Embedding(3, 4), "x")
    with pytest.raises(TypeError, match="wraps an nn.Embedding"):
        lora_ext.LoraEmbedding(nn.Linear(3, 4), "x")


def test_hooked_base_layer_still_runs_its_hooks():
    """Hooks on the wrapped layer (accelerate offload, FSDP on the layer) must fire: unfused path."""
    layer = lora_ext.LoraLinear(_linear(), "default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 24)
    ref = layer(x)
    seen = []
    handle = layer.base_layer.register_forward_pre_hook(lambda mod, args: seen.append(1))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    assert seen == [1]
    handle.remove()
