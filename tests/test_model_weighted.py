"""add_weighted_adapter: the combined factors and outputs equal PEFT's (linear, cat, svd); refusals change nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from model_helpers import assert_unchanged, copy_state, randomize_lora, snapshot, tiny_cnn, tiny_gpt2, tiny_llama

import lora_ext

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LLAMA_A = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
LLAMA_B = dict(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"])


def _twins(base, configs: dict[str, dict]):
    """Our model and PEFT's with the same adapters (random non-zero factors, copied from ours)."""
    ours = copy.deepcopy(base)
    for name, kwargs in configs.items():
        lora_ext.inject_adapter(ours, lora_ext.LoraConfig(init_lora_weights=False, **kwargs), name)
    randomize_lora(ours, seed=1)
    pm = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in configs.items():
            cfg = peft.LoraConfig(init_lora_weights=False, **kwargs)
            if pm is None:
                pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
    pm.eval()
    copy_state(ours, pm.base_model.model)
    return ours, pm


def _new_tensors(model, name: str) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k.removeprefix("base_model.model."): v for k, v in sd.items() if f".{name}" in k}


def _assert_same_adapter(ours, pm, name: str, exact: bool = True):
    got, want = _new_tensors(ours, name), _new_tensors(pm.base_model.model, name)
    assert got and set(got) == set(want)
    for k in want:
        if exact:  # same operations in the same order: the same bits
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ours._lora_ext_state.configs[name].r == pm.peft_config[name].r
    assert ours._lora_ext_state.configs[name].lora_alpha == pm.peft_config[name].lora_alpha


COMBOS = {
    "cat": dict(combination_type="cat"),
    "svd": dict(combination_type="svd"),
    "svd_rank_clamp": dict(combination_type="svd", svd_rank=3, svd_clamp=0.9),
    "svd_reduced": dict(combination_type="svd", svd_rank=2, svd_full_matrices=False),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_llama_combinations_equal_peft(combo):
    ours, pm = _twins(tiny_llama(), {"a": LLAMA_A, "b": LLAMA_B})
    kwargs = COMBOS[combo]
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [0.7, -1.3], "mix", **kwargs)
    pm.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", **kwargs)
    _assert_same_adapter(ours, pm, "mix")
    # added inactive and frozen, as PEFT
    assert lora_ext.active_adapters(ours) == ["a"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix" in n)
    lora_ext.set_adapter(ours, "mix")
    pm.set_adapter("mix")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combo", ["cat", "svd"])
def test_rank_pattern_sources_equal_peft(combo):
    """Per-layer ranks below the config's largest: cat pads with zeros, svd truncates, as PEFT."""
    a = dict(LLAMA_A, rank_pattern={"v_proj": 2})
    b = dict(LLAMA_B, rank_pattern={r"layers\.0\.self_attn\.q_proj": 3}, alpha_pattern={"o_proj": 5})
    ours, pm = _twins(tiny_llama(), {"a": a, "b": b})
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.5, 0.25], "mix", combination_type=combo)
    pm.add_weighted_adapter(["a", "b"], [1.5, 0.25], "mix", combination_type=combo)
    _assert_same_adapter(ours, pm, "mix")
    assert ours._lora_ext_state.configs["mix"].r == (4 + 3 if combo == "cat" else 4)


def test_cat_and_svd_reproduce_the_weighted_sum_of_updates():
    """cat is exact: the new update is Σ w_i s_i B_i A_i; svd at full rank too (within fp32 rounding)."""
    ours, _ = _twins(tiny_llama(), {"a": LLAMA_A, "b": LLAMA_B})
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [0.7, -1.3], "cat", combination_type="cat")
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [0.7, -1.3], "svd", combination_type="svd", svd_rank=6)
    layer = ours.model.layers[0].self_attn.q_proj

    def update(name):
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        return layer.scaling[name] * (b @ a)

    want = 0.7 * update("a") - 1.3 * update("b")
    assert layer.r["cat"] == 6 and layer.scaling["cat"] == 1.0
    torch.testing.assert_close(update("cat"), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(update("svd"), want, rtol=1e-4, atol=1e-5)


def test_linear_single_adapter_and_embedding_equal_peft():
    ours, pm = _twins(tiny_llama(), {"a": LLAMA_A, "c": dict(LLAMA_A, lora_alpha=5)})
    lora_ext.add_weighted_adapter(ours, ["a", "c"], [0.5, 2.0], "lin", combination_type="linear")
    pm.add_weighted_adapter(["a", "c"], [0.5, 2.0], "lin", combination_type="linear")
    _assert_same_adapter(ours, pm, "lin")
    # one adapter: PEFT combines linearly whatever the type (here the default, svd)
    lora_ext.add_weighted_adapter(ours, ["a"], [-0.5], "neg")
    pm.add_weighted_adapter(["a"], [-0.5], "neg")
    _assert_same_adapter(ours, pm, "neg")
    emb = ours.model.embed_tokens
    assert "neg" in emb.lora_embedding_A


@pytest.mark.parametrize("combo", ["linear", "cat", "svd"])
def test_gpt2_conv1d_combinations_equal_peft(combo):
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    ours, pm = _twins(tiny_gpt2(), {"a": cfg, "b": dict(cfg, lora_alpha=2)})
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.0, 0.5], "mix", combination_type=combo)
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination_type=combo)
    _assert_same_adapter(ours, pm, "mix")
    assert ours._lora_ext_state.configs["mix"].fan_in_fan_out is True
    lora_ext.set_adapter(ours, "mix")
    pm.set_adapter("mix")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combo", ["linear", "cat", "svd"])
def test_conv2d_combinations_equal_peft(combo):
    cfg = dict(r=2, lora_alpha=4, target_modules=["stem", "point"])
    ours, pm = _twins(tiny_cnn(), {"a": cfg, "b": dict(cfg, lora_alpha=3)})
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [0.3, 0.9], "mix", combination_type=combo)
    pm.add_weighted_adapter(["a", "b"], [0.3, 0.9], "mix", combination_type=combo)
    # PEFT forms a 3x3 conv's update with a convolution, ours with a matmul: equal to rounding
    _assert_same_adapter(ours, pm, "mix", exact=combo != "svd")
    lora_ext.set_adapter(ours, "mix")
    pm.set_adapter("mix")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(combination_type="ties", density=0.5), "combination_type='ties' is not implemented"),
        (dict(combination_type="dare_linear_svd"), "combination_type='dare_linear_svd' is not implemented"),
        (dict(combination_type="magnitude_prune"), "not implemented"),
        (dict(combination_type="mean"), "combination_type must be one of"),
        (dict(combination_type="cat", density=0.5), "density=0.5 only applies to TIES"),
        (dict(majority_sign_method="frequency"), "majority_sign_method only applies to TIES"),
        (dict(combination_type="cat", svd_rank=2), "svd_rank=2 only apply to combination_type='svd'"),
        (dict(combination_type="linear", svd_full_matrices=False), "svd_full_matrices=False only apply"),
        (dict(combination_type="linear"), "needs adapters of one rank"),
        (dict(svd_rank=0), "svd_rank must be a positive integer"),
        (dict(svd_clamp=1.5), r"svd_clamp must be a quantile in \[0, 1\]"),
        (dict(svd_driver="gesvdj"), "svd_driver='gesvdj' needs CUDA tensors"),
        (dict(svd_driver="magic"), "svd_driver must be one of"),
        (dict(svd_rank=40), "svd rank 40 exceeds"),
    ],
)
def test_refusals_leave_the_model_unchanged(kwargs, match):
    ours, _ = _twins(tiny_llama(), {"a": LLAMA_A, "b": LLAMA_B})
    snap = snapshot(ours)
    with pytest.raises(ValueError, match=match):
        lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", **kwargs)
    assert_unchanged(ours, snap)


@pytest.mark.parametrize(
    "args, match",
    [
        ((["a", "zz"], [1.0, 1.0], "mix"), "unknown adapter 'zz'"),
        ((["a", "b"], [1.0], "mix"), "2 adapters but 1 weights"),
        ((["a", "b"], [1.0, float("nan")], "mix"), "finite real numbers"),
        ((["a", "b"], [1.0, "2"], "mix"), "finite real numbers"),
        ((["a", "a"], [1.0, 1.0], "mix"), "lists a name twice"),
        (([], [], "mix"), "non-empty list"),
        (("a", [1.0], "mix"), "non-empty list"),
        ((["a", "b"], [1.0, 1.0], "b"), "already has an adapter named 'b'"),
        ((["a", "b"], [1.0, 1.0], "x.y"), "without '.'"),
    ],
)
def test_bad_names_and_weights(args, match):
    ours, _ = _twins(tiny_llama(), {"a": LLAMA_A, "b": LLAMA_B})
    snap = snapshot(ours)
    with pytest.raises(ValueError, match=match):
        lora_ext.add_weighted_adapter(ours, *args)
    assert_unchanged(ours, snap)


def test_refused_on_grouped_conv_and_shared_modules_to_save():
    ours, _ = _twins(
        tiny_cnn(), {"a": dict(r=2, target_modules=["grouped"]), "b": dict(r=2, target_modules=["grouped"])}
    )
    snap = snapshot(ours)
    with pytest.raises(ValueError, match="not defined for the grouped convolution 'grouped'"):
        lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert_unchanged(ours, snap)
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", combination_type="linear")  # allowed

    cfg = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours, _ = _twins(tiny_llama(), {"a": cfg, "b": cfg})
    snap = snapshot(ours)
    with pytest.raises(ValueError, match="trains a copy of 'lm_head'"):
        lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert_unchanged(ours, snap)


def test_save_combined_adapter_loads_in_peft(tmp_path):
    base = tiny_gpt2()
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn"])
    ours, _ = _twins(base, {"a": cfg, "b": dict(cfg, target_modules=["c_fc"])})
    lora_ext.add_weighted_adapter(ours, ["a", "b"], [1.0, -1.0], "mix", combination_type="cat")
    lora_ext.set_adapter(ours, "mix")
    lora_ext.save_adapter(ours, str(tmp_path), "mix")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
