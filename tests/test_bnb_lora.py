"""LoRA on bitsandbytes 4-bit models (``bnb.nn.Linear4bit``, nf4 and fp4, with and without double
quantization) against bitsandbytes and PEFT themselves: LoraLinear4bit (lora_ext/nn/bnb.py).

bitsandbytes runs on its default (pure-PyTorch) dequantize here: its native CPU
kernel is wrong on AVX-512 machines for some shapes, see tests/bnb_oracle.py.
Shapes whose rows are multiples of the blocksize (the tiny Llama's 64 and 128)
are compared with bitsandbytes' forward; odd shapes with its default kernel.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from bnb_oracle import default_dequantize_4bit
from conftest import ATOL, assert_rule, max_err
from model_helpers import (
    LLAMA_TARGETS,
    assert_unchanged,
    copy_state,
    inject,
    llama_ids,
    lora_grads,
    randomize_lora,
    snapshot,
    tiny_llama,
)
from torch import nn

import lora_ext
from lora_ext.nn.bnb import LoraLinear4bit, is_bnb_linear4bit

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

QUANT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
QUANT_IDS = ["nf4-dq", "nf4", "fp4-dq", "fp4"]


@pytest.fixture(scope="module", autouse=True)
def _bnb_default_dequantize():
    with default_dequantize_4bit():
        yield


# ----------------------------------------------------------------------------- builders


def linear4bit(weight, bias, quant_type, double_quant, compute_dtype, blocksize=64):
    """A quantized ``bnb.nn.Linear4bit`` holding ``weight`` [N, K] (its dtype is the quant_state dtype)."""
    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type)  # fmt: skip
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def bnb_quantize(model, quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    """Every nn.Linear but lm_head becomes a quantized Linear4bit (what BitsAndBytesConfig(load_in_4bit) does)."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not name.endswith("lm_head"):
            q = linear4bit(m.weight, m.bias, quant_type, double_quant, compute_dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT's bnb dispatch asks for it
    return model


class Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_model(base, **kwargs):
    base.is_loaded_in_4bit = True  # what transformers sets; PEFT's bnb dispatch asks for it
    kwargs.setdefault("target_modules", list(LLAMA_TARGETS))
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **kwargs}
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))


def bnb_dequantize(layer, dtype=torch.float32):
    """bitsandbytes' own dequantize_4bit (its default kernel inside this module)."""
    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)


def layer_case(quant_type, double_quant, compute_dtype, n=128, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    return linear4bit(w, bias, quant_type, double_quant, compute_dtype)


def set_factors(layer_a, layer_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer_a.copy_(torch.randn(layer_a.shape, generator=g) * 0.2)
        layer_b.copy_(torch.randn(layer_b.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("quant_type,double_quant", QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("shape", [(128, 64), (37, 96), (5, 200)], ids=str)
def test_dequantize_equals_bitsandbytes(quant_type, double_quant, shape):
    layer = layer_case(quant_type, double_quant, torch.float32, *shape)
    lora = LoraLinear4bit(layer)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(lora.dequantize(dtype), bnb_dequantize(layer, dtype))


@pytest.mark.parametrize("quant_type,double_quant", QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_forward_backward_equals_peft(quant_type, double_quant, compute_dtype):
    base = Holder(layer_case(quant_type, double_quant, compute_dtype))
    ref = peft_model(base, target_modules=["proj"])
    assert type(ref.base_model.model.proj).__module__ == "peft.tuners.lora.bnb"
    ours = lora_ext.inject_adapter(copy.deepcopy(base), lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = ours.proj
    assert isinstance(layer, LoraLinear4bit) and layer.lora_A["default"].weight.dtype == torch.float32
    set_factors(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    copy_state(ours, ref.base_model.model)

    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    y, y_ref = ours(xs[0]), ref(xs[1])
    assert y.dtype == torch.float32 and y.shape == (3, 7, 128)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    y_ref.backward(g)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ra, rb = ref.base_model.model.proj.lora_A["default"].weight, ref.base_model.model.proj.lora_B["default"].weight
    if compute_dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for ours_t, ref_t in ((xs[0].grad, xs[1].grad), (a.grad, ra.grad), (b.grad, rb.grad)):
            torch.testing.assert_close(ours_t, ref_t, rtol=1e-5, atol=1e-5)
        return
    # bf16 compute: the tolerance rule of docs/design.md §4 against float64, where "plain PyTorch in the
    # same dtype" is the unfused formula in the compute dtype on bitsandbytes' dequantized weight
    w = bnb_dequantize(base.proj, torch.float32)
    bias = base.proj.bias.detach()
    xr = x.double().requires_grad_(True)
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y64 = nn.functional.linear(xr, w.double(), bias.double()) + 2.0 * (xr @ a64.t()) @ b64.t()
    y64.backward(g.double())
    xb = x.bfloat16().requires_grad_(True)
    ab, bb = a.detach().bfloat16().requires_grad_(True), b.detach().bfloat16().requires_grad_(True)
    yb = nn.functional.linear(xb, w.bfloat16(), bias.bfloat16()) + 2.0 * (xb @ ab.t()) @ bb.t()
    yb.backward(g.bfloat16())
    assert_rule("y", y, y64, yb.float(), torch.float32)
    # bitsandbytes' (PEFT's) own bf16 output obeys the same bound: both round in the compute dtype
    assert_rule("y_peft", y_ref.detach(), y64, yb.float(), torch.float32)
    for name, got, r64, rb16 in (("grad_x", xs[0].grad, xr.grad, xb.grad), ("grad_A", a.grad, a64.grad, ab.grad),
                                 ("grad_B", b.grad, b64.grad, bb.grad)):  # fmt: skip
        assert_rule(name, got, r64, rb16.float(), torch.float32)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)], ids=["nf4-dq", "fp4"])
@pytest.mark.parametrize("n,k", [(37, 96), (5, 200)], ids=str)
def test_odd_shapes_and_strided_input_equal_peft(quant_type, double_quant, n, k):
    """Blocks that straddle rows, M that misses every tile, a non-contiguous x, two active adapters."""
    base = Holder(layer_case(quant_type, double_quant, torch.float32, n, k))
    cfg = dict(r=5, lora_alpha=7, target_modules=["proj"], init_lora_weights=False)
    ours = lora_ext.inject_adapter(copy.deepcopy(base), lora_ext.LoraConfig(**cfg))
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**{**cfg, "r": 3}), "second")
    lora_ext.set_adapter(ours, ["default", "second"])
    ref = peft_model(base, **cfg)
    ref.add_adapter("second", peft.LoraConfig(**{**cfg, "r": 3}))
    ref.base_model.set_adapter(["default", "second"])
    randomize_lora(ours, std=0.2)
    copy_state(ours, ref.base_model.model)
    x = torch.randn(k, 13, generator=torch.Generator().manual_seed(3)).t()  # [13, k], strided
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y, y_ref = ours(xs[0]), ref(xs[1])
    y.square().sum().backward()
    y_ref.square().sum().backward()
    g, g_ref = lora_grads(ours), lora_grads(ref)
    assert len(g) == 4 and set(g) == set(g_ref)
    # The yardstick is float64 on bitsandbytes' dequantized weight (the tolerance rule, docs/design.md
    # §4), PEFT + bitsandbytes in fp32 being "plain PyTorch": the fused kernels (whose variant follows
    # the CPU) and PEFT sum in different orders, so a fixed 1e-5 between the two is not a contract.
    layer, bias = ours.proj, base.proj.bias
    scaling = ref.base_model.model.proj.scaling  # alpha / r from PEFT, independent of ours
    x64 = x.double().requires_grad_(True)
    y64 = nn.functional.linear(x64, bnb_dequantize(base.proj, torch.float32).double(), bias.detach().double())
    f64 = {}
    for name in ("default", "second"):
        a64 = layer.lora_A[name].weight.detach().double().requires_grad_(True)
        b64 = layer.lora_B[name].weight.detach().double().requires_grad_(True)
        f64[f"proj.lora_A.{name}.weight"], f64[f"proj.lora_B.{name}.weight"] = a64, b64
        y64 = y64 + scaling[name] * (x64 @ a64.t()) @ b64.t()
    y64.square().sum().backward()
    assert_rule("y", y.detach(), y64.detach(), y_ref.detach(), torch.float32)
    assert_rule("grad_x", xs[0].grad, x64.grad, xs[1].grad, torch.float32)
    for key in g:
        assert_rule(key, g[key], f64[key].grad, g_ref[key], torch.float32)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_nf4_forward_reads_bitsandbytes_storage_in_place(double_quant, monkeypatch):
    """The fused NF4 op gets the Params4bit codes and the quant_state tensors themselves (no copy)."""
    base = layer_case("nf4", double_quant, torch.float32)
    qs = base.weight.quant_state
    before = base.weight.data.clone()
    layer = LoraLinear4bit(base, "default", r=3, lora_alpha=6, init_lora_weights=False)
    seen = []
    real = lora_ext.ops.lora_linear

    def spy(x, weight, *args, **kwargs):
        seen.append(weight)
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(lora_ext.ops, "lora_linear", spy)
    layer.train()
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert len(seen) == 1 and isinstance(seen[0], lora_ext.NF4Weight)
    w = seen[0]
    assert w.packed.data_ptr() == base.weight.data_ptr()
    assert w.absmax.data_ptr() == qs.absmax.data_ptr()
    if double_quant:
        assert w.nested_absmax.data_ptr() == qs.state2.absmax.data_ptr()
        assert w.nested_code.data_ptr() == qs.state2.code.data_ptr()
        assert w.offset_value == pytest.approx(float(qs.offset))
    else:
        assert w.nested_absmax is None
    assert torch.equal(base.weight.data, before) and base.weight.quant_state is qs
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None


def test_compute_dtype_is_bitsandbytes(monkeypatch):
    """compute_dtype=None: bitsandbytes sets it from the first input (fp32/bf16), as its own forward does."""
    base = layer_case("nf4", True, None)
    layer = LoraLinear4bit(base, "default", r=2, lora_alpha=2, init_lora_weights=False)
    assert not base.compute_type_is_set
    y = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert base.compute_dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    base16 = layer_case("nf4", True, torch.bfloat16)
    layer16 = LoraLinear4bit(base16, "default", r=2, lora_alpha=2, init_lora_weights=False)
    seen = []
    real = lora_ext.ops.lora_linear
    monkeypatch.setattr(lora_ext.ops, "lora_linear", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    assert layer16(torch.randn(3, 64)).dtype == torch.float32  # output in x's dtype
    assert seen == [torch.bfloat16]  # computed in the compute dtype


def _quantized_llama(quant_type, double_quant, compute_dtype=torch.float32, seed=0):
    return bnb_quantize(tiny_llama(seed), quant_type, double_quant, compute_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("quant_type,double_quant", QUANT, ids=QUANT_IDS)
def test_tiny_llama_matches_peft(quant_type, double_quant):
    base = _quantized_llama(quant_type, double_quant)
    assert sum(is_bnb_linear4bit(m) for m in base.modules()) == 14
    ours = inject(copy.deepcopy(base), r=4, lora_alpha=8)
    wrapped = [n for n, m in ours.named_modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 14
    randomize_lora(ours, std=0.2)
    ref = peft_model(base)
    copy_state(ours, ref.base_model.model)
    assert lora_ext.trainable_parameters(ours) == ref.get_nb_trainable_parameters()  # 4-bit counted as PEFT does
    ours.train()
    ref.train()
    ids = llama_ids(seed=3)
    y, y_ref = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    g, g_ref = lora_grads(ours), lora_grads(ref)
    assert len(g) == 28
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_save_and_load_adapter_both_ways(tmp_path):
    base = _quantized_llama("nf4", True)
    ours = inject(copy.deepcopy(base), r=4, lora_alpha=8)
    randomize_lora(ours, std=0.2)
    ids = llama_ids(seed=4)
    with torch.no_grad():
        y = ours(ids).logits
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    theirs.train()  # eval + no_grad would switch bitsandbytes to its repacked AVX512-BF16 CPU kernel
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, y, rtol=1e-4, atol=1e-5)

    ref = peft_model(base).train()
    randomize_lora(ref, seed=5, std=0.2)
    ref.save_pretrained(str(tmp_path / "peft"))
    loaded = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    assert sum(isinstance(m, LoraLinear4bit) for m in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)


def _float64_merged_reference(model):
    """A float64 copy of an injected (unmerged) model whose LoRA layers are dense W + s·BA (bnb's dequantize)."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, LoraLinear4bit):
            w = bnb_dequantize(m.base_layer).double()
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


@pytest.mark.slow
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)], ids=["nf4-dq", "fp4"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_and_unload_runs_in_model_dtype(quant_type, double_quant, compute_dtype):
    """An fp32 model of 4-bit layers computing in bf16 gets fp32 nn.Linear layers back; merged output
    equals unmerged within the compute dtype's rounding (tolerance rule against float64)."""
    model = inject(_quantized_llama(quant_type, double_quant, compute_dtype), r=4, lora_alpha=8)
    check_merge_and_unload(model, compute_dtype)


def check_merge_and_unload(model, compute_dtype):
    randomize_lora(model, std=0.2)
    ids = llama_ids(seed=6)
    ref64 = _float64_merged_reference(model)
    with torch.no_grad():
        y_unmerged = model(ids).logits
        y64 = ref64(ids).logits
    lora_ext.merge_and_unload(model)
    assert not any(is_bnb_linear4bit(m) or isinstance(m, LoraLinear4bit) for m in model.modules())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32 and not q.weight.requires_grad
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        y_merged = model(ids).logits
    assert y_merged.dtype == torch.float32
    err_merged, err_unmerged = max_err(y_merged, y64), max_err(y_unmerged, y64)
    bound = 2 * err_unmerged + ATOL[torch.float32] * max(1.0, y64.abs().max().item())
    assert err_merged <= bound, f"merged error {err_merged:.3e} > 2 x unmerged {err_unmerged:.3e} + atol"
    # and the unmerged (4-bit) model itself against float64: the compute dtype's rounding, not more
    scale = y64.abs().max().item()
    assert err_unmerged <= (4e-2 if compute_dtype == torch.bfloat16 else 1e-4) * scale


@pytest.mark.slow
def test_transformers_load_in_4bit_model(tmp_path):
    """The model transformers builds for BitsAndBytesConfig(load_in_4bit=True): inject, equal to PEFT,
    and merge_and_unload of an fp32 model computing in bf16 gives fp32 layers."""
    transformers = pytest.importorskip("transformers")
    tiny_llama().save_pretrained(tmp_path)

    def load(compute_dtype):
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip
        with torch._dynamo.config.patch(disable=True):
            return transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, quantization_config=cfg, device_map="cpu", dtype=torch.float32
            )

    base = load(torch.float32)
    ours = inject(copy.deepcopy(base), r=4, lora_alpha=8)
    assert sum(isinstance(m, LoraLinear4bit) for m in ours.modules()) == 14
    randomize_lora(ours, std=0.2)
    ref = peft_model(base).train()
    copy_state(ours, ref.base_model.model)
    ours.train()
    ids = llama_ids(seed=9)
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    check_merge_and_unload(inject(load(torch.bfloat16), r=4, lora_alpha=8), torch.bfloat16)


def test_merge_unmerge_restores_the_4bit_layer():
    base = layer_case("nf4", True, torch.float32)
    layer = LoraLinear4bit(base, "default", r=4, lora_alpha=8, init_lora_weights=False)
    set_factors(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    codes, absmax = base.weight.data.clone(), base.weight.quant_state.absmax.clone()
    x = torch.randn(6, 64)
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
        w = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.base_layer.weight, bnb_dequantize(base) + 2.0 * w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert layer.base_layer is base and not layer.merged
        assert torch.equal(base.weight.data, codes) and torch.equal(base.weight.quant_state.absmax, absmax)
        assert torch.equal(layer(x), y0)


def test_requantize_merged_equals_peft_merge():
    """requantize_merged() gives PEFT's merge result: the merged weight re-quantized by bitsandbytes."""
    base = Holder(layer_case("nf4", True, torch.float32))
    ours = lora_ext.inject_adapter(copy.deepcopy(base), lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    set_factors(ours.proj.lora_A["default"].weight, ours.proj.lora_B["default"].weight)
    ref = peft_model(base, target_modules=["proj"])
    copy_state(ours, ref.base_model.model)
    with pytest.warns(UserWarning):
        merged_ref = ref.merge_and_unload().proj
    ours.proj.merge()
    with pytest.warns(UserWarning, match="requantiz"):
        requant = ours.proj.requantize_merged()
    assert is_bnb_linear4bit(requant) and requant.weight.quant_state.quant_type == "nf4"
    torch.testing.assert_close(bnb_dequantize(requant), bnb_dequantize(merged_ref), rtol=0, atol=1e-6)


def test_disabled_adapters_give_the_bitsandbytes_base():
    base = layer_case("fp4", True, torch.float32)
    ref = copy.deepcopy(base)
    model = lora_ext.inject_adapter(Holder(base), lora_ext.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                                      init_lora_weights=False))  # fmt: skip
    x = torch.randn(5, 64, requires_grad=True)
    with lora_ext.disable_adapters(model):
        y = model(x)
    torch.testing.assert_close(y, ref(x.detach().requires_grad_(True)), rtol=1e-5, atol=1e-5)


def test_unquantized_linear4bit_is_refused_and_model_unchanged():
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # on the CPU but never moved: not quantized
    model = Holder(layer)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not quantized"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=2, target_modules=["proj"]))
    assert_unchanged(model, snap)
    with pytest.raises(TypeError, match="Linear4bit"):
        LoraLinear4bit(nn.Linear(4, 4))


def test_bitsandbytes_repacked_weight():
    """bitsandbytes' CPU inference path (eval, no grad, AVX512-BF16) rewrites the weight layout in place:
    the forward then goes through bitsandbytes' own forward, and a merge is refused clearly."""
    base = layer_case("nf4", True, torch.float32)
    if not base.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes repacks only on AVX512-BF16 CPUs")
    base.eval()
    with torch.no_grad():
        base(torch.randn(2, 64))
    assert base.weight.quant_state.packing_format_for_cpu
    layer = LoraLinear4bit(base, "default", r=2, lora_alpha=4, init_lora_weights=False).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(y, base(x) + 2.0 * (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="repacked"):
        layer.merge()
    assert not layer.merged and layer.base_layer is base
    # through the model API: refused before any layer is merged
    model = nn.Sequential(layer_case("nf4", True, torch.float32), nn.ReLU(), copy.deepcopy(base))
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    with pytest.raises(ValueError, match="cannot merge into '2'"):
        lora_ext.merge_adapter(model)
    assert not model[0].merged and is_bnb_linear4bit(model[0].base_layer)


def test_lora_ext_imports_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, lora_ext\n"
        "from lora_ext.nn.bnb import is_bnb_linear4bit\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "lora_ext.inject_adapter(m, lora_ext.LoraConfig(r=2, target_modules=['0']))\n"
        "assert type(m[0]).__name__ == 'LoraLinear' and not is_bnb_linear4bit(m[0].base_layer)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_compile_fullgraph(quant_type):
    model = inject(_quantized_llama(quant_type, True), r=4, lora_alpha=8)
    randomize_lora(model, std=0.2)
    ids = llama_ids(seed=10)
    torch._dynamo.reset()
    with torch.no_grad():
        y = model(ids).logits
        y_compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-5)
