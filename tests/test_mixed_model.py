"""Mixed-adapter batches at the model level: ``model(..., adapter_names=[...])``.

Eval: equal to PEFT's own mixed-batch forward. Training (PEFT refuses it): each
adapter's gradients equal those of running its rows alone with that adapter active.
Everything that cannot be honoured raises.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from model_helpers import LLAMA_TARGETS, copy_state, inject, llama_ids, randomize_lora, tiny_llama

import lora_ext

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# adapter "a": every Llama linear, rank 4; "b": attention only plus the embedding, rank 2 (different ranks/targets)
CONFIG_A = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
CONFIG_B = dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "embed_tokens"])
NAMES = ["a", "__base__", "b", "a", "b"]


def _ours(dropout: float = 0.0):
    model = tiny_llama()
    inject(model, "a", seed=1, lora_dropout=dropout, **CONFIG_A)
    inject(model, "b", seed=2, lora_dropout=dropout, **CONFIG_B)
    randomize_lora(model, seed=3)
    return model


def _peft_twin(ours):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(**CONFIG_A), adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(**CONFIG_B))
    pm.eval()
    copy_state(ours, pm.base_model.model)
    return pm


def test_eval_equals_peft():
    ours = _ours()
    pm = _peft_twin(ours)
    ids = llama_ids(batch=len(NAMES), seq=7)
    with torch.no_grad():
        got = ours(ids, adapter_names=NAMES).logits
        want = pm(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and each row equals a plain single-adapter forward of that row (the adapters really differ)
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            if name == "__base__":
                with lora_ext.disable_adapters(ours):
                    row = ours(ids[i : i + 1]).logits
            else:
                lora_ext.set_adapter(ours, name)
                row = ours(ids[i : i + 1]).logits
        torch.testing.assert_close(got[i : i + 1], row, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[2], atol=1e-3)  # "a" and "b" differ on a row...
    assert (got[0] - got[3]).abs().max() > 0 or torch.equal(ids[0], ids[3])


def test_modules_to_save_rows_equal_peft():
    """A modules_to_save lm_head: each row goes through its adapter's copy (the original for "__base__")."""
    peft = pytest.importorskip("peft")
    cfg_a = dict(CONFIG_A, modules_to_save=["lm_head"])
    cfg_b = dict(CONFIG_B, modules_to_save=["lm_head"])  # (PEFT raises KeyError for an adapter without a copy)
    ours = tiny_llama()
    inject(ours, "a", seed=1, **cfg_a)
    inject(ours, "b", seed=2, **cfg_b)
    randomize_lora(ours, seed=3)
    with torch.no_grad():  # the copies differ from the original and from each other
        ours.lm_head.modules_to_save["a"].weight.mul_(1.5)
        ours.lm_head.modules_to_save["b"].weight.mul_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg_a), adapter_name="a")
        pm.add_adapter("b", peft.LoraConfig(**cfg_b))
    pm.eval()
    copy_state(ours, pm.base_model.model)
    ids = llama_ids(batch=len(NAMES), seq=5)
    with torch.no_grad():
        got = ours(ids, adapter_names=NAMES).logits
        want = pm(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_gradients_come_from_own_rows():
    """Training with adapter_names: the loss is a sum over independent rows, so adapter X's
    gradients must equal those of a forward of X's rows alone with X active."""
    ours = _ours().train()
    lora_ext.set_adapter(ours, ["a", "b"])  # both trainable (only active adapters train, as in PEFT)
    ids = llama_ids(batch=len(NAMES), seq=6)
    ours(ids, adapter_names=NAMES).logits.float().pow(2).sum().backward()
    mixed = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    assert any(".a." in n or n.endswith(".a") for n in mixed) and any(".b." in n or n.endswith(".b") for n in mixed)
    for adapter in ("a", "b"):
        ref = copy.deepcopy(ours)
        ref.zero_grad(set_to_none=True)
        lora_ext.set_adapter(ref, adapter)
        rows = [i for i, n in enumerate(NAMES) if n == adapter]
        ref(ids[rows]).logits.float().pow(2).sum().backward()
        for name, p in ref.named_parameters():
            if f".{adapter}." in name or name.endswith(f".{adapter}"):
                assert p.grad is not None, name
                torch.testing.assert_close(mixed[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # a "__base__" row gives no gradient to any adapter
    ours.zero_grad(set_to_none=True)
    ours(ids, adapter_names=NAMES).logits[1].sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in ours.parameters())


def test_training_dropout_uses_each_rows_adapter_rate():
    """In training, dropout acts on the LoRA branch: two calls with different RNG states differ, eval does not."""
    ours = _ours(dropout=0.5).train()
    ids = llama_ids(batch=len(NAMES), seq=5)
    torch.manual_seed(0)
    y1 = ours(ids, adapter_names=NAMES).logits
    torch.manual_seed(1)
    y2 = ours(ids, adapter_names=NAMES).logits
    base_row = 1
    assert not torch.allclose(y1[0], y2[0])
    torch.testing.assert_close(y1[base_row], y2[base_row])  # "__base__" rows have no dropout branch
    ours.eval()
    with torch.no_grad():
        e1, e2 = ours(ids, adapter_names=NAMES).logits, ours(ids, adapter_names=NAMES).logits
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)


def test_names_are_cleared_after_the_call_and_after_an_error():
    ours = _ours()
    ids = llama_ids(batch=2, seq=4)
    with torch.no_grad():
        plain = ours(ids).logits
        ours(ids, adapter_names=["b", "b"])
        torch.testing.assert_close(ours(ids).logits, plain, rtol=0, atol=0)
        with pytest.raises(ValueError, match="entries"):
            ours(ids, adapter_names=["a", "b", "a"])
        torch.testing.assert_close(ours(ids).logits, plain, rtol=0, atol=0)
    assert all(getattr(m, "_mixed_adapter_names", None) is None for m in ours.modules())


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["a", "nope"], ValueError, "unknown adapter"),
        (["a"], ValueError, "2 rows"),
        ("a", TypeError, "list of str"),
        ([1, 2], TypeError, "list of str"),
    ],
)
def test_bad_names_raise(names, error, match):
    ours = _ours()
    with pytest.raises(error, match=match):
        ours(llama_ids(batch=2, seq=4), adapter_names=names)


def test_merged_and_disabled_raise():
    ours = _ours()
    ids = llama_ids(batch=2, seq=4)
    lora_ext.merge_adapter(ours)
    with pytest.raises(ValueError, match="merged"):
        ours(ids, adapter_names=["a", "__base__"])
    lora_ext.unmerge_adapter(ours)
    with lora_ext.disable_adapters(ours), pytest.raises(ValueError, match="disable_adapters"):
        ours(ids, adapter_names=["a", "__base__"])
    ours(ids, adapter_names=["a", "__base__"])


def test_layer_level_length_mismatch_raises():
    layer = lora_ext.LoraLinear(torch.nn.Linear(8, 4), "default", r=2)
    layer._mixed_adapter_names = ["default", "__base__"]
    with pytest.raises(ValueError, match="LoraLinear"):
        layer(torch.randn(3, 8))


def test_dora_adapters_are_refused():
    """A layer whose adapter carries a DoRA magnitude (PEFT's attribute names) is not plain LoRA: it raises."""
    layer = lora_ext.LoraLinear(torch.nn.Linear(8, 4), "default", r=2)
    layer.use_dora = {"default": True}
    layer._mixed_adapter_names = ["default", "__base__"]
    with pytest.raises(ValueError, match="DoRA"):
        layer(torch.randn(2, 8))


def test_layers_with_dora_adapters_raise_or_give_the_base():
    """A layer holding DoRA magnitudes: asked for its adapter it raises (model level, before anything
    runs); holding none of the requested adapters it gives every row the base output."""
    model = tiny_llama()
    inject(model, "a", seed=1, **CONFIG_A)
    inject(model, "b", seed=2, r=2, lora_alpha=3, target_modules=["v_proj"])
    randomize_lora(model, seed=3)
    q = model.model.layers[0].self_attn.q_proj
    q.lora_magnitude_vector = torch.nn.ModuleDict({"a": torch.nn.Linear(1, 1)})  # stands in for a DoRA layer
    ids = llama_ids(batch=2, seq=4)
    with pytest.raises(ValueError, match=r"DoRA adapters \(model\.layers\.0\.self_attn\.q_proj"):
        model(ids, adapter_names=["a", "__base__"])
    with torch.no_grad():
        got = model(ids, adapter_names=["b", "b"]).logits  # q_proj holds no "b": base output there
        lora_ext.set_adapter(model, "b")
        want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not q._disable_adapters


def test_conv1d_layer_routes_rows_and_overridden_forwards_are_refused():
    """LoraConv1D (weight [in, out], square so a missing transpose would not fail on shapes) routes rows;
    a LoraLinear subclass with a forward of its own (DoRA, bitsandbytes) is not taken as mixed-capable."""
    from lora_ext.nn.mixed import linear_forward, mixed_support

    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    layer = lora_ext.nn.conv.LoraConv1D(conv1d(8, 8), "a", r=2, init_lora_weights=False)
    layer.add_adapter("b", 3, 6, init_lora_weights=False)
    layer.eval()
    x = torch.randn(3, 5, 8)
    names = ["b", "__base__", "a"]
    got = linear_forward(layer, x, names)
    for i, n in enumerate(names):
        layer.set_active(() if n == "__base__" else (n,))
        torch.testing.assert_close(got[i : i + 1], layer(x[i : i + 1]), rtol=1e-5, atol=1e-6)
    assert mixed_support(layer)

    class OwnForward(lora_ext.LoraLinear):
        def forward(self, x):
            return self.base_layer(x)

    assert not mixed_support(OwnForward(torch.nn.Linear(4, 4), "a", r=2))


def test_layer_without_mixed_support_raises_naming_it():
    """modules_to_save around a module whose rows are not independent for PEFT (an RMSNorm): asking
    for its adapter raises and names the layer; a batch without that adapter runs."""
    model = tiny_llama()
    inject(model, "a", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])
    inject(model, "b", r=2, lora_alpha=4, target_modules=["v_proj"])
    ids = llama_ids(batch=2, seq=4)
    with pytest.raises(ValueError, match=r"ModulesToSaveWrapper \(model\..*norm\) has no mixed-adapter support"):
        model(ids, adapter_names=["a", "__base__"])
    model(ids, adapter_names=["b", "__base__"])


def test_nf4_layers_route_rows():
    """QLoRA: LoraLinearNF4 layers run the mixed op on the dequantized base; each row equals its
    adapter's plain forward."""
    model = tiny_llama()
    lora_ext.quantize_model(model)
    inject(model, "a", seed=1, **CONFIG_A)
    inject(model, "b", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    randomize_lora(model, seed=3)
    assert any(isinstance(m, lora_ext.LoraLinearNF4) for m in model.modules())
    ids = llama_ids(batch=len(NAMES), seq=5)
    with torch.no_grad():
        got = model(ids, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with lora_ext.disable_adapters(model):
                    row = model(ids[i : i + 1]).logits
            else:
                lora_ext.set_adapter(model, name)
                row = model(ids[i : i + 1]).logits
            torch.testing.assert_close(got[i : i + 1], row, rtol=1e-5, atol=1e-5)


def test_unload_removes_the_hooks():
    ours = _ours()
    lora_ext.unload(ours)
    assert not ours._forward_pre_hooks and not ours._forward_hooks


def test_peft_twin_keys_match():
    ours = _ours()
    pm = _peft_twin(ours)
    assert set(ours.state_dict()) == set(pm.base_model.model.state_dict())
