"""FastVisionModel.get_peft_model: the four switches select exactly the vision tower's or the language model's
attention or MLP projections (Llava with a CLIP tower, Qwen2-VL, ViT; all 16 switch combinations against
lists written out by name here), never the projector; target_modules/modules_to_save add it; a training step
updates the selected layers; a saved Llava loads through FastVisionModel.from_pretrained in 4 bits."""

from __future__ import annotations

import itertools

import pytest
import torch
from fast_helpers import save_model
from model_helpers import tiny_vit

import lora_ext
from lora_ext import FastVisionModel, LinearNF4
from lora_ext.model import lora_layers

transformers = pytest.importorskip("transformers")

_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
}
LLAMA_ATTN, LLAMA_MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]


def llava(seed: int = 0):
    clip = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    cfg = transformers.LlavaConfig(
        vision_config=clip,
        text_config=transformers.LlamaConfig(**_LLAMA),
        image_token_index=63,
        vision_feature_layer=-1,  # the last vision layer feeds the projector (default -2 leaves it unused)
    )
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(cfg)


def qwen2_vl(seed: int = 0):
    text = {**_LLAMA, "vocab_size": 200, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    text.update(bos_token_id=1, eos_token_id=2)
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2, "patch_size": 2}
    vision.update(spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    cfg = transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=190, video_token_id=191,
        vision_start_token_id=192, vision_end_token_id=193,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.Qwen2VLForConditionalGeneration(cfg)


def _names(prefix, layers, attn, mlp):
    out = {"attn": [], "mlp": []}
    for i in range(2):
        out["attn"] += [f"{prefix}.{layers}.{i}.{a}" for a in attn]
        out["mlp"] += [f"{prefix}.{layers}.{i}.{m}" for m in mlp]
    return out


# Expected selections, written out by name (the implementation finds them by tower, block and type).
EXPECTED = {
    "llava": {
        "vision": _names(
            "model.vision_tower.encoder", "layers", [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
            ["mlp.fc1", "mlp.fc2"],
        ),
        "language": _names(
            "model.language_model", "layers", [f"self_attn.{p}" for p in LLAMA_ATTN], [f"mlp.{p}" for p in LLAMA_MLP]
        ),
    },
    "qwen2_vl": {
        "vision": _names("model.visual", "blocks", ["attn.qkv", "attn.proj"], ["mlp.fc1", "mlp.fc2"]),
        "language": _names(
            "model.language_model", "layers", [f"self_attn.{p}" for p in LLAMA_ATTN], [f"mlp.{p}" for p in LLAMA_MLP]
        ),
    },
    "vit": {
        "vision": _names("vit", "layers", [f"attention.{p}" for p in LLAMA_ATTN], ["mlp.fc1", "mlp.fc2"]),
        "language": {"attn": [], "mlp": []},
    },
}  # fmt: skip
NEVER = {
    "llava": ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head"],
    "qwen2_vl": ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"],
    "vit": ["classifier"],
}
BUILDERS = {"llava": llava, "qwen2_vl": qwen2_vl, "vit": tiny_vit}
SWITCHES = list(itertools.product([True, False], repeat=4))


def _expected(family, vision, language, attention, mlp):
    out = set()
    for tower, on in (("vision", vision), ("language", language)):
        if on:
            out |= set(EXPECTED[family][tower]["attn"]) if attention else set()
            out |= set(EXPECTED[family][tower]["mlp"]) if mlp else set()
    return out


@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda s: "".join("VLAM"[i] if on else "-" for i, on in enumerate(s))
)
@pytest.mark.parametrize("family", list(BUILDERS))
def test_switches_select_exactly(family, switches):
    model = BUILDERS[family]()
    vision, language, attention, mlp = switches
    expected = _expected(family, *switches)
    kwargs = dict(
        finetune_vision_layers=vision, finetune_language_layers=language,
        finetune_attention_modules=attention, finetune_mlp_modules=mlp, r=4, use_gradient_checkpointing=False,
    )  # fmt: skip
    if not expected:
        with pytest.raises(ValueError, match="select no layer"):
            FastVisionModel.get_peft_model(model, **kwargs)
        assert getattr(model, "_lora_ext_state", None) is None
        return
    FastVisionModel.get_peft_model(model, **kwargs)
    got = {n for n, _ in lora_layers(model)}
    assert got == expected
    assert not got & set(NEVER[family])


def test_target_modules_and_modules_to_save_add_the_projector():
    model = llava()
    FastVisionModel.get_peft_model(
        model, r=4, target_modules=["multi_modal_projector.linear_1"], use_gradient_checkpointing=False
    )
    got = {n for n, _ in lora_layers(model)}
    assert got == _expected("llava", True, True, True, True) | {"model.multi_modal_projector.linear_1"}

    model = llava()
    FastVisionModel.get_peft_model(
        model, r=4, finetune_vision_layers=False, modules_to_save=["multi_modal_projector"],
        use_gradient_checkpointing=False,
    )  # fmt: skip
    assert {n for n, _ in lora_layers(model)} == _expected("llava", False, True, True, True)
    assert all(p.requires_grad for p in model.model.multi_modal_projector.modules_to_save["default"].parameters())

    model = llava()
    FastVisionModel.get_peft_model(model, r=4, target_modules="all-linear", use_gradient_checkpointing=False)
    assert {n for n, _ in lora_layers(model)} == _expected("llava", True, True, True, True)


def test_layers_to_transform_filters_the_selection():
    model = llava()
    FastVisionModel.get_peft_model(model, r=4, layers_to_transform=[1], use_gradient_checkpointing=False)
    got = {n for n, _ in lora_layers(model)}
    assert got == {n for n in _expected("llava", True, True, True, True) if ".layers.1." in n}


def test_bad_switch_types_and_refusals():
    with pytest.raises(TypeError, match="finetune_vision_layers must be a bool"):
        FastVisionModel.get_peft_model(llava(), finetune_vision_layers="yes")
    model = llava()
    with pytest.raises(ValueError, match="LoftQ"):
        FastVisionModel.get_peft_model(model, loftq_config={"loftq_bits": 4})
    assert getattr(model, "_lora_ext_state", None) is None


def _lora_grads_by_tower(model):
    grads = {"vision": 0, "language": 0}
    for n, p in model.named_parameters():
        if ".lora_" in n and p.grad is not None and torch.count_nonzero(p.grad) > 0:
            grads["language" if "language_model" in n else "vision"] += 1
    return grads


@pytest.mark.parametrize("checkpointing", [False, True, "unsloth"], ids=["plain", "ckpt", "unsloth"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "vit"])
def test_training_step(family, checkpointing):
    model = BUILDERS[family]()
    FastVisionModel.get_peft_model(
        model, r=4, lora_dropout=0.1, init_lora_weights=False, use_gradient_checkpointing=checkpointing
    )
    FastVisionModel.for_training(model)
    torch.manual_seed(1)
    if family == "llava":
        ids = torch.tensor([[1, 63, 63, 63, 63, 5, 6, 7], [1, 63, 63, 63, 63, 9, 10, 11]])
        out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), labels=ids)
    elif family == "qwen2_vl":
        ids = torch.tensor([[1, 192, 190, 193, 5, 6, 7]])
        out = model(
            input_ids=ids, pixel_values=torch.randn(4, 24), image_grid_thw=torch.tensor([[1, 2, 2]]), labels=ids,
            mm_token_type_ids=(ids == 190).long(),
        )  # fmt: skip
    else:
        out = model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 0]))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.1).zero_grad()
    out.loss.backward()
    grads = _lora_grads_by_tower(model)
    n_vision = len(EXPECTED[family]["vision"]["attn"] + EXPECTED[family]["vision"]["mlp"])
    assert grads["vision"] == 2 * n_vision  # lora_A and lora_B of every vision layer got a gradient
    if family != "vit":
        assert grads["language"] == 2 * 14
    torch.optim.SGD(params, lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params) if p.grad is not None)
    FastVisionModel.for_inference(model)
    assert not model.training


def test_from_pretrained_4bit_llava(tmp_path):
    folder = save_model(llava(seed=3), str(tmp_path / "llava"), tokenizer=True)
    model, tok = FastVisionModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=True)
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    assert tok is not None
    ref = lora_ext.quantize_model(
        transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    )
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert isinstance(model.model.vision_tower.encoder.layers[0].self_attn.q_proj, LinearNF4)
    FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False, use_gradient_checkpointing=False)
    assert {n for n, _ in lora_layers(model)} == _expected("llava", False, True, True, True)
