"""LoRA on GPT-2's Conv1D and on nn.Conv1d/2d/3d, and exclude_modules: equal to PEFT, files both ways, merging."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import assert_rule
from model_helpers import (
    assert_close_dicts,
    assert_unchanged,
    copy_state,
    lora_grads,
    peft_twin,
    randomize_lora,
    snapshot,
    tiny_cnn,
    tiny_gpt2,
    tiny_vit,
)
from torch import nn

import lora_ext
from lora_ext.nn import LoraConv1D, LoraConv2d

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

Conv1D = transformers.pytorch_utils.Conv1D


# ------------------------------------------------------------------ models


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(seed))


def _images(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _pair(base: nn.Module, kwargs: dict):
    """(ours, PEFT) on copies of ``base`` with the same random non-zero factors."""
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_lora(ours, seed=1)
    pm = peft_twin(base, dict(init_lora_weights=False, **kwargs), ours=ours)
    return ours, pm


def _adapted(model: nn.Module) -> list[str]:
    """Names of the LoRA layers (ours or PEFT's)."""
    kinds = (lora_ext.nn.LoraLayer, peft.tuners.lora.LoraLayer)
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, kinds))


def _check_same_as_peft(ours, pm, run_ours, run_peft, rtol=1e-5, atol=1e-6):
    assert set(ours.state_dict()) == set(pm.base_model.model.state_dict())
    assert _adapted(ours) == _adapted(pm)
    y_ours, y_peft = run_ours(ours), run_peft(pm)
    torch.testing.assert_close(y_ours, y_peft, rtol=rtol, atol=atol)
    (y_ours.float() ** 2).mean().backward()
    (y_peft.float() ** 2).mean().backward()
    assert_close_dicts(lora_grads(ours), lora_grads(pm), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------- GPT-2

GPT2_CASES = {
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "names": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*\.attn\.c_(attn|proj)"),
    "exclude_list": dict(
        r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["mlp.c_proj", "h.0.attn.c_attn"]
    ),
    "exclude_regex": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], exclude_modules=r".*\.1\..*"),
    "with_embedding": dict(r=4, lora_alpha=8, target_modules=["wte", "c_fc"], lora_dropout=0.2),
}


@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2_matches_peft(case):
    ours, pm = _pair(tiny_gpt2(), GPT2_CASES[case])
    assert any(isinstance(m, LoraConv1D) for m in ours.modules())
    if "exclude_modules" in GPT2_CASES[case]:
        assert len(_adapted(ours)) < 8
    ids = _ids()
    _check_same_as_peft(ours, pm, lambda m: m(ids).logits, lambda m: m(input_ids=ids).logits)
    # PEFT switches fan_in_fan_out on for Conv1D targets; the stored config does too
    assert lora_ext.model.adapter_config(ours).fan_in_fan_out is pm.peft_config["default"].fan_in_fan_out is True


def test_gpt2_all_linear_finds_conv1d_not_the_head():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules="all-linear"))
    names = _adapted(model)
    assert len(names) == 8 and "lm_head" not in names  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per layer
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraConv1D) and layer.in_features == 32 and layer.out_features == 96
    assert layer.lora_A["default"].weight.shape == (8, 32) and layer.lora_B["default"].weight.shape == (96, 8)


def test_conv1d_fused_call_gets_a_transposed_view(monkeypatch):
    """The fused op reads Conv1D's weight through .t() (a view), never a copy."""
    model = tiny_gpt2()
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    layer = model.transformer.h[0].attn.c_attn
    seen = []
    real = lora_ext.ops.lora_linear

    def spy(x, weight, *args, **kwargs):
        seen.append(weight)
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(lora_ext.ops, "lora_linear", spy)
    layer(torch.randn(2, 5, 32))
    assert seen and seen[0].data_ptr() == layer.base_layer.weight.data_ptr() and seen[0].shape == (96, 32)


@pytest.mark.parametrize("strategy", [0, 1, 2], ids=["auto", "shrink_expand", "merge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_op_on_a_transposed_weight(dtype, strategy):
    """The op as LoraConv1D calls it (W = Conv1D.weight.t(), column-major): opcheck, and the same
    output and gradients as on a contiguous copy of W."""
    g = torch.Generator().manual_seed(5)
    m, k, n, r = 13, 37, 29, 3
    w_t = (torch.randn(k, n, generator=g) / k**0.5).to(dtype).t()  # [N, K] view of a [K, N] tensor
    assert not w_t.is_contiguous()
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    op = torch.ops.lora_ext.lora_linear.default
    args = (x.requires_grad_(True), w_t, bias, a.requires_grad_(True), b.requires_grad_(True), 0.7, 0.0, None, strategy)
    torch.library.opcheck(op, args)
    outs = []
    for w in (w_t, w_t.contiguous()):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        y = op(leaves[0], w, bias, leaves[1], leaves[2], 0.7, 0.0, None, strategy)
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_conv1d_against_float64(dtype):
    """Forward and every gradient of LoraConv1D against the float64 formula x W + b + s (x Aᵀ) Bᵀ."""
    g = torch.Generator().manual_seed(3)
    k, n, r, s = 37, 29, 5, 1.5
    base = Conv1D(n, k)
    with torch.no_grad():
        base.weight.copy_(torch.randn(k, n, generator=g) / k**0.5)
        base.bias.copy_(torch.randn(n, generator=g))
    base = base.to(dtype)
    layer = LoraConv1D(base, "default", r=r, lora_alpha=s * r, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(r, k, generator=g) / k**0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(n, r, generator=g) / r**0.5)
    x = torch.randn(3, 7, k, generator=g).to(dtype).requires_grad_(True)
    y = layer(x)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)

    def formula(x_, w_, b_, a_, bb_):
        return x_ @ w_ + b_ + s * ((x_ @ a_.t()) @ bb_.t())

    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, a, bb)]
    ref = formula(leaves64[0], base.weight.double(), base.bias.double(), leaves64[1], leaves64[2])
    ref.backward(gy.double())
    # plain PyTorch in the same dtype (PEFT's unfused formula) sets the error budget
    leaves_pt = [t.detach().to(dtype).requires_grad_(True) for t in (x, a, bb)]
    pt = formula(leaves_pt[0], base.weight, base.bias, leaves_pt[1].to(dtype), leaves_pt[2].to(dtype))
    pt.backward(gy)
    assert_rule("y", y, ref, pt, dtype)
    for name, got, r64, rpt in zip(("x.grad", "A.grad", "B.grad"), (x.grad, a.grad, bb.grad), leaves64, leaves_pt):
        assert_rule(name, got.to(rpt.grad.dtype), r64.grad, rpt.grad, dtype)


def test_gradcheck_conv_layers_float64():
    g = torch.Generator().manual_seed(0)
    conv1d = LoraConv1D(Conv1D(5, 7).double(), "default", r=3, lora_alpha=6, init_lora_weights=False)
    conv2d = LoraConv2d(nn.Conv2d(3, 4, 3, stride=2, padding=1).double(), "default", r=2, lora_alpha=3,
                        init_lora_weights=False)  # fmt: skip
    for layer, shape in ((conv1d, (2, 3, 7)), (conv2d, (2, 3, 5, 5))):
        params = [p for p in layer.parameters() if p.requires_grad]
        assert len(params) == 2
        x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

        def fn(x_, a_, b_, layer=layer):
            return torch.func.functional_call(layer, {"lora_A.default.weight": a_, "lora_B.default.weight": b_}, (x_,))

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_hooked_conv1d_base_runs_its_hooks():
    """A base layer with hooks (accelerate offload) is called as a module; the LoRA branch is added unfused."""
    ours, pm = _pair(tiny_gpt2(), dict(r=4, lora_alpha=8, target_modules=["c_attn"]))
    calls = []
    layer = ours.transformer.h[0].attn.c_attn
    layer.base_layer.register_forward_hook(lambda *_: calls.append(1))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_delete_and_unload_give_the_base_layers_back():
    model = tiny_gpt2()
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=["c_attn"]), "a")
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=["c_fc"]), "b")
    lora_ext.delete_adapter(model, "a")
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert isinstance(model.transformer.h[0].mlp.c_fc, LoraConv1D)
    cnn = lora_ext.inject_adapter(tiny_cnn(), lora_ext.LoraConfig(target_modules=["stem", "seq", "vol"]))
    lora_ext.unload(cnn)
    assert type(cnn.stem) is nn.Conv2d and type(cnn.seq) is nn.Conv1d and type(cnn.vol) is nn.Conv3d


def test_gpt2_files_both_ways(tmp_path):
    base = tiny_gpt2()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    ids = _ids()
    # PEFT saves -> lora_ext loads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    randomize_lora(pm, seed=2)
    pm.save_pretrained(str(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True)
    y_peft = pm(input_ids=ids).logits
    y_ours = ours(ids).logits
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-6)
    (y_ours**2).mean().backward()
    (y_peft**2).mean().backward()
    assert_close_dicts(lora_grads(ours), lora_grads(pm), rtol=1e-4, atol=1e-6)
    # lora_ext saves -> PEFT loads
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(again(input_ids=ids).logits, y_peft, rtol=1e-5, atol=1e-6)


def test_gpt2_merge_unmerge_and_unload_match_peft():
    ours, pm = _pair(tiny_gpt2(), dict(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = _ids()
    w0 = ours.transformer.h[0].mlp.c_fc.base_layer.weight.detach().clone()
    y = ours(ids).logits
    lora_ext.merge_adapter(ours)
    torch.testing.assert_close(ours(ids).logits, y, rtol=1e-5, atol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(
        ours.transformer.h[0].mlp.c_fc.base_layer.weight,
        pm.base_model.model.transformer.h[0].mlp.c_fc.base_layer.weight,
    )
    lora_ext.unmerge_adapter(ours)
    torch.testing.assert_close(ours.transformer.h[0].mlp.c_fc.base_layer.weight, w0, rtol=0, atol=1e-6)
    plain = lora_ext.merge_and_unload(ours)
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(plain(ids).logits, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(ids).logits, pm.merge_and_unload()(ids).logits, rtol=1e-5, atol=1e-5)


def test_fan_in_fan_out_follows_the_layer_type_as_peft():
    model = copy.deepcopy(tiny_vit())
    linear_name = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear)).rsplit(".", 1)[-1]
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=[linear_name], fan_in_fan_out=True))
    assert lora_ext.model.adapter_config(model).fan_in_fan_out is False


# ---------------------------------------------------------- exclude_modules


@pytest.mark.parametrize(
    "target_modules, exclude_modules",
    [
        ("all-linear", ["c_attn"]),
        ("all-linear", ["transformer.h.1.mlp.c_fc", "c_proj"]),
        (["c_attn", "c_proj", "c_fc"], r".*mlp.*"),
        (r".*\.c_(attn|fc)", ["h.0.attn.c_attn"]),
        (["c_fc", "wte"], ["wte"]),
    ],
)
def test_exclude_modules_selects_what_peft_selects(target_modules, exclude_modules):
    base = tiny_gpt2()
    kwargs = dict(target_modules=target_modules, exclude_modules=exclude_modules)
    ours = lora_ext.inject_adapter(copy.deepcopy(base), lora_ext.LoraConfig(**kwargs))
    pm = peft_twin(base, kwargs)
    assert _adapted(ours) and _adapted(ours) == _adapted(pm)


def test_exclude_modules_files_both_ways(tmp_path):
    base = tiny_gpt2()
    kwargs = dict(r=4, target_modules=["c_attn", "c_fc"], exclude_modules=["h.1.mlp.c_fc"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    randomize_lora(pm, seed=4)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    assert _adapted(ours) == _adapted(pm) and "transformer.h.1.mlp.c_fc" not in _adapted(ours)
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["exclude_modules"] == ["h.1.mlp.c_fc"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert _adapted(again) == _adapted(pm)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_exclude_modules_everything_or_nothing():
    model = tiny_gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="exclude_modules.*leaves no module to adapt"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=["c_attn"], exclude_modules=["attn.c_attn"]))
    assert_unchanged(model, snap)
    with pytest.warns(UserWarning, match="exclude_modules=\\['nope'\\] matches no module"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=["c_attn"], exclude_modules=["nope"]))
    for bad in ([""], 3, [1]):
        with pytest.raises(ValueError, match="exclude_modules must be"):
            lora_ext.LoraConfig(target_modules=["c_attn"], exclude_modules=bad)


# --------------------------------------------------------------- convolutions

CNN_CASES = {
    "conv2d": dict(r=4, lora_alpha=8, target_modules=["stem", "point"]),
    "grouped": dict(r=4, lora_alpha=8, target_modules=["grouped"]),
    "conv1d_conv3d": dict(r=2, lora_alpha=5, target_modules=["seq", "vol", "head"]),
    "rslora_regex": dict(r=4, lora_alpha=8, target_modules=r"(stem|seq|vol)", use_rslora=True),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["stem", "point", "seq"], exclude_modules=["point"]),
}


@pytest.mark.parametrize("case", list(CNN_CASES))
def test_cnn_matches_peft(case):
    ours, pm = _pair(tiny_cnn(), CNN_CASES[case])
    x = _images()
    _check_same_as_peft(ours, pm, lambda m: m(x), lambda m: m(x))


def test_cnn_files_both_ways(tmp_path):
    base = tiny_cnn()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["stem", "grouped", "seq", "vol"], init_lora_weights=False)
    x = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    randomize_lora(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    with torch.no_grad():
        y_peft = pm(x)
        torch.testing.assert_close(ours(x), y_peft, rtol=1e-5, atol=1e-6)
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), y_peft, rtol=1e-5, atol=1e-6)


def test_two_active_adapters_match_peft():
    base = tiny_gpt2()
    ours = copy.deepcopy(base)
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**cfg), "a")
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(**dict(cfg, r=2)), "b")
    randomize_lora(ours, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(**dict(cfg, r=2)))
    pm.eval()
    copy_state(ours, pm.base_model.model)
    lora_ext.set_adapter(ours, ["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    ids = _ids()
    _check_same_as_peft(ours, pm, lambda m: m(ids).logits, lambda m: m(input_ids=ids).logits)


def test_cnn_bf16_within_rounding_of_float64():
    base = tiny_cnn().to(torch.bfloat16)
    ours = copy.deepcopy(base)
    lora_ext.inject_adapter(ours, lora_ext.LoraConfig(r=4, target_modules=["stem", "point", "seq", "vol"],
                                                      init_lora_weights=False))  # fmt: skip
    randomize_lora(ours, seed=1)
    assert ours.stem.lora_A["default"].weight.dtype == torch.float32  # fp32 adapters, as PEFT
    pm = peft_twin(base, dict(r=4, target_modules=["stem", "point", "seq", "vol"], init_lora_weights=False), ours=ours)
    x = _images().to(torch.bfloat16)
    ref = copy.deepcopy(ours).double()
    with torch.no_grad():
        assert_rule("cnn", ours(x), ref(x.double()), pm(x), torch.bfloat16)


def test_vit_patch_embedding_matches_peft_and_files(tmp_path):
    base = tiny_vit()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["projection", "classifier"])
    ours, pm = _pair(base, kwargs)
    assert isinstance(ours.vit.embeddings.patch_embeddings.projection, LoraConv2d)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _check_same_as_peft(ours, pm, lambda m: m(pixel_values=x).logits, lambda m: m(pixel_values=x).logits)
    lora_ext.save_adapter(ours, str(tmp_path / "ours"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).logits, ours(pixel_values=x).logits, rtol=1e-5, atol=1e-6)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, pm(pixel_values=x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_conv_merge_unmerge_equal_to_peft(channels_last):
    ours, pm = _pair(tiny_cnn(), dict(r=4, lora_alpha=8, target_modules=["stem", "point", "seq", "vol"]))
    if channels_last:
        ours.stem.base_layer.weight.data = ours.stem.base_layer.weight.data.to(memory_format=torch.channels_last)
        assert not ours.stem.base_layer.weight.is_contiguous()
    x = _images()
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        y = ours(x)
        lora_ext.merge_adapter(ours)
        pm.merge_adapter()
        for name in w0:
            torch.testing.assert_close(
                ours.get_submodule(name).base_layer.weight,
                pm.base_model.model.get_submodule(name).base_layer.weight,
                rtol=1e-5,
                atol=1e-6,
            )
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
        lora_ext.unmerge_adapter(ours)
        for name, w in w0.items():
            torch.testing.assert_close(ours.get_submodule(name).base_layer.weight, w, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-6)
        plain = lora_ext.merge_and_unload(ours)
        assert type(plain.stem) is nn.Conv2d and type(plain.seq) is nn.Conv1d and type(plain.vol) is nn.Conv3d
        torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_dilated_and_reflect_padded_conv_merge_consistent():
    """The LoRA conv takes the base's dilation and padding mode, so merged == unmerged (PEFT's A conv uses neither)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2, padding_mode="reflect"))
    model = lora_ext.inject_adapter(base, lora_ext.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    randomize_lora(model, seed=1)
    x = _images()
    with torch.no_grad():
        y = model(x)
        ref = nn.functional.conv2d(
            nn.functional.pad(x.double(), (2, 2, 2, 2), mode="reflect"), model[0].merged_weight().double(),
            model[0].base_layer.bias.double(), dilation=2,
        )  # fmt: skip
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        lora_ext.merge_adapter(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_conv_errors_leave_the_model_unchanged():
    model = tiny_cnn()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="r=3 must be a multiple of the convolution's groups=2"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=3, target_modules=["grouped"]))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="target 'stem' is a Conv2d"):  # an integer (non-float) base weight
        bad = tiny_cnn()
        bad.stem.weight = nn.Parameter(torch.zeros(8, 3, 3, 3, dtype=torch.int32), requires_grad=False)
        lora_ext.inject_adapter(bad, lora_ext.LoraConfig(target_modules=["stem"]))
    lora_ext.inject_adapter(
        model, lora_ext.LoraConfig(r=4, target_modules=["stem", "grouped"], init_lora_weights=False)
    )
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot merge LoRA into a Conv2d with groups=2"):
        lora_ext.merge_adapter(model)
    assert_unchanged(model, snap)  # stem was not merged either
    with pytest.raises(ValueError, match="cannot merge"):
        lora_ext.merge_and_unload(model)
    assert_unchanged(model, snap)


def test_all_linear_on_a_model_without_linear_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"no linear layer \(nn.Linear or transformers Conv1D\)"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules="all-linear"))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_device_gpt2_and_cnn_match_peft(device, dtype):
    """Per device: the fused op on Conv1D's transposed weight and the conv layers, against PEFT and float64."""
    ids = _ids().to(device)
    images = _images().to(device)
    for base, targets in ((tiny_gpt2(), "all-linear"), (tiny_cnn(), ["stem", "point", "seq", "vol"])):
        gpt = targets == "all-linear"

        def run(m, gpt=gpt):
            if gpt:
                return m(ids).logits
            w = next(m.parameters())
            return m(images.to(w.dtype))

        base = base.to(device, dtype)
        ours, pm = _pair(base, dict(r=4, lora_alpha=8, target_modules=targets))
        ref = copy.deepcopy(ours).double()
        with torch.no_grad():
            y, y_peft, y64 = run(ours), run(pm), run(ref)
            if dtype == torch.float32:
                torch.testing.assert_close(y, y_peft, rtol=1e-4, atol=1e-4)
            else:
                assert_rule(f"{device} {type(base).__name__}", y, y64, y_peft, dtype)
            lora_ext.merge_adapter(ours)
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(run(ours).float(), y.float(), rtol=tol, atol=tol)


def test_new_layers_compile_without_graph_breaks():
    torch.manual_seed(0)
    conv1d = LoraConv1D(Conv1D(16, 8), "default", r=2, lora_alpha=4, init_lora_weights=False)
    conv2d = LoraConv2d(nn.Conv2d(3, 4, 3), "default", r=2, lora_alpha=4, init_lora_weights=False)
    for layer, x in ((conv1d, torch.randn(3, 5, 8)), (conv2d, torch.randn(2, 3, 6, 6))):
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))
