"""Bad input: a clear error that names the problem, and the model left exactly as it was."""

from __future__ import annotations

import json
import os

import pytest
from model_helpers import assert_unchanged, inject, snapshot, tiny_llama

import lora_ext

safetensors_torch = pytest.importorskip("safetensors.torch")
load_file, save_file = safetensors_torch.load_file, safetensors_torch.save_file


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def adapter_dir(tmp_path):
    """A valid adapter for tiny_llama (r=4 on q_proj/v_proj)."""
    src = tiny_llama()
    inject(src, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    path = tmp_path / "adapter"
    lora_ext.save_adapter(src, str(path))
    return path


def _expect(model, exc, match, fn, *args, **kwargs):
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------- injection


def test_unknown_target_name_is_named(model):
    cfg = lora_ext.LoraConfig(target_modules=["q_proj", "qq_proj"])
    _expect(model, ValueError, r"\['qq_proj'\] match no module", lora_ext.inject_adapter, model, cfg)


def test_target_matching_nothing(model):
    cfg = lora_ext.LoraConfig(target_modules=r".*\.attention\.query")
    _expect(model, ValueError, "matches no module", lora_ext.inject_adapter, model, cfg)
    cfg = lora_ext.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7])
    _expect(model, ValueError, "matches no module", lora_ext.inject_adapter, model, cfg)


def test_unsupported_module_type(model):
    cfg = lora_ext.LoraConfig(target_modules=["q_proj", "input_layernorm"])
    _expect(
        model,
        ValueError,
        r"input_layernorm.*LlamaRMSNorm.*LoRA layers exist for nn.Linear, nn.Embedding",
        lora_ext.inject_adapter,
        model,
        cfg,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), r"r \(the rank\) must be a positive integer, got 0"),
        (dict(r=-2), "must be a positive integer, got -2"),
        (dict(r=2.5), "must be a positive integer, got 2.5"),
        (dict(lora_alpha=0), r"lora_alpha.*positive finite number, got 0"),
        (dict(lora_alpha=-1.0), "positive finite number, got -1.0"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
        (dict(alpha_pattern={"q_proj": float("nan")}), r"alpha_pattern\['q_proj'\]"),
        (dict(lora_dropout=1.0), "lora_dropout must be a number in"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be"),
        (dict(target_modules=None), "target_modules is required"),
    ],
)
def test_bad_config_values(kwargs, match):
    kwargs.setdefault("target_modules", ["q_proj"])
    with pytest.raises(ValueError, match=match):
        lora_ext.LoraConfig(**kwargs)


def test_config_mutated_after_creation_is_checked_before_injection(model):
    cfg = lora_ext.LoraConfig(target_modules=["q_proj"])
    cfg.r = 0
    _expect(model, ValueError, "must be a positive integer, got 0", lora_ext.inject_adapter, model, cfg)


def test_duplicate_and_bad_adapter_names(model):
    inject(model, "a")
    cfg = lora_ext.LoraConfig(target_modules=["q_proj"])
    _expect(model, ValueError, "already has an adapter named 'a'", lora_ext.inject_adapter, model, cfg, "a")
    _expect(model, ValueError, "without '.'", lora_ext.inject_adapter, model, cfg, "x.y")
    _expect(model, ValueError, "without '.'", lora_ext.inject_adapter, model, cfg, "")


def test_unknown_adapter_name(model, tmp_path):
    inject(model, "a")
    msg = r"unknown adapter 'b'; the model has adapters \['a'\]"
    _expect(model, ValueError, msg, lora_ext.set_adapter, model, "b")
    _expect(model, ValueError, msg, lora_ext.set_adapter, model, ["a", "b"])
    _expect(model, ValueError, msg, lora_ext.delete_adapter, model, "b")
    _expect(model, ValueError, msg, lora_ext.save_adapter, model, str(tmp_path / "x"), "b")
    assert not (tmp_path / "x").exists()


def test_model_without_adapters(model):
    for fn in (lora_ext.active_adapter, lora_ext.merge_adapter, lora_ext.unmerge_adapter, lora_ext.merge_and_unload):
        _expect(model, ValueError, "has no LoRA adapters", fn, model)


def test_not_a_config(model):
    _expect(model, TypeError, "config must be a lora_ext.LoraConfig", lora_ext.inject_adapter, model, {"r": 4})


# ------------------------------------------------------------------- loading


def test_shape_mismatch_when_loading(adapter_dir):
    other = tiny_llama(hidden_size=32, intermediate_size=64)  # same names, other shapes
    _expect(
        other,
        ValueError,
        r"shape mismatch for model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\[4, 64\].*\[4, 32\]",
        lora_ext.load_adapter,
        other,
        str(adapter_dir),
    )


def test_rank_in_config_disagrees_with_file(model, adapter_dir):
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    _expect(
        model,
        ValueError,
        r"shape mismatch.*the file has \[4, 64\], the model needs \[8, 64\] \(r=8\)",
        lora_ext.load_adapter,
        model,
        str(adapter_dir),
    )


def test_loading_into_model_with_an_adapter_leaves_it_unchanged(model, adapter_dir):
    inject(model, "a", target_modules=["k_proj"])
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, str(weights))
    _expect(model, ValueError, "shape mismatch for", lora_ext.load_adapter, model, str(adapter_dir), "b")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_safetensors(model, adapter_dir, damage):
    path = adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not json at all" + os.urandom(64))
    else:
        path.write_bytes(b"")
    _expect(
        model,
        ValueError,
        r"adapter_model\.safetensors.*corrupt or truncated",
        lora_ext.load_adapter,
        model,
        str(adapter_dir),
    )


def test_missing_and_unexpected_keys(model, adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = next(k for k in tensors if ".layers.1.self_attn.v_proj.lora_A" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path))
    _expect(
        model,
        ValueError,
        r"v_proj.*needs tensors \['lora_A.weight', 'lora_B.weight'\]",
        lora_ext.load_adapter,
        model,
        str(adapter_dir),
    )
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = tensors[dropped].clone()
    save_file(tensors, str(path))
    _expect(model, ValueError, r"does not target.*up_proj", lora_ext.load_adapter, model, str(adapter_dir))


def test_bad_config_files(model, adapter_dir, tmp_path):
    cfg_path = adapter_dir / "adapter_config.json"
    good = cfg_path.read_text()
    cfg_path.write_text("{not json")
    _expect(model, ValueError, "is not valid JSON", lora_ext.load_adapter, model, str(adapter_dir))
    cfg = json.loads(good)
    cfg["peft_type"] = "IA3"
    cfg_path.write_text(json.dumps(cfg))
    _expect(model, ValueError, "only LoRA adapters are supported.*IA3", lora_ext.load_adapter, model, str(adapter_dir))
    cfg = json.loads(good)
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    # a DoRA config whose file lacks the magnitude vectors
    _expect(model, ValueError, "lora_magnitude_vector", lora_ext.load_adapter, model, str(adapter_dir))
    _expect(model, FileNotFoundError, "does not exist", lora_ext.load_adapter, model, str(tmp_path / "nowhere"))
    os.remove(cfg_path)
    _expect(model, FileNotFoundError, "adapter_config.json", lora_ext.load_adapter, model, str(adapter_dir))
