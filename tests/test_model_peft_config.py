"""Drop-in for PEFT users: every peft.LoraConfig field, peft configs passed directly, all task types."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from model_helpers import LLAMA_TARGETS, assert_unchanged, llama_config, llama_ids, randomize_lora, snapshot

import lora_ext
from lora_ext.model import config as config_module

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ----------------------------------------------------------------- config fields


def test_every_peft_field_is_a_field_with_the_same_default():
    ours = {f.name: f for f in dataclasses.fields(lora_ext.LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert set(theirs) <= set(ours), f"missing: {sorted(set(theirs) - set(ours))}"
    for name, f in theirs.items():
        if name == "runtime_config":  # PEFT's LoraRuntimeConfig object; ours is None (= its off value)
            continue
        assert _default(ours[name]) == _default(f), name


def test_every_field_is_in_exactly_one_group():
    implemented = {
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "use_rslora",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "fan_in_fan_out",
        "use_dora",
    }
    groups = [
        implemented,
        set(config_module.KEPT_FIELDS),
        set(config_module.UNSUPPORTED_FEATURES),
    ]
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)), "a field is in two groups"
    assert set(names) == {f.name for f in dataclasses.fields(lora_ext.LoraConfig)}


@pytest.mark.parametrize("name", sorted(config_module.UNSUPPORTED_FEATURES))
def test_feature_field_refused_unless_off(name):
    off, _ = config_module.UNSUPPORTED_FEATURES[name]
    lora_ext.LoraConfig(target_modules=["q_proj"], **{name: off})  # the off value is accepted
    on = True if off is False else {"ephemeral_gpu_offload": True} if name == "runtime_config" else ["x"]
    with pytest.raises(ValueError, match=rf"LoraConfig\.{name}=.*not supported.*accelerate"):
        lora_ext.LoraConfig(target_modules=["q_proj"], **{name: on})


def test_task_type_is_validated_and_kept():
    assert lora_ext.LoraConfig(target_modules=["q"], task_type="SEQ_CLS").task_type == "SEQ_CLS"
    assert lora_ext.LoraConfig(target_modules=["q"], task_type=peft.TaskType.TOKEN_CLS).task_type == "TOKEN_CLS"
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        lora_ext.LoraConfig(target_modules=["q"], task_type="SEQ_CLASSIFICATION")
    with pytest.raises(ValueError, match="only LoRA adapters"):
        lora_ext.LoraConfig(target_modules=["q"], peft_type="IA3")


BOOKKEEPING = dict(
    task_type="CAUSAL_LM",
    base_model_name_or_path="org/tiny-llama",
    revision="v1",
    peft_version="0.21.2",
    auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama"},
    eva_config=None,
    qalora_group_size=32,
)


def test_config_round_trip_lora_ext_json_peft_and_back(tmp_path):
    ours = lora_ext.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.1,
        rank_pattern={"v_proj": 2},
        modules_to_save=["lm_head"],
        **BOOKKEEPING,
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(ours.to_peft_dict()))
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.LoraConfig)
    for name in ("r", "lora_alpha", "lora_dropout", "rank_pattern", "modules_to_save", *BOOKKEEPING):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert theirs.target_modules == {"q_proj", "v_proj"}
    assert theirs.inference_mode is True  # as PEFT's save_pretrained writes it
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = lora_ext.LoraConfig.from_peft_dict(json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    again = lora_ext.LoraConfig.from_peft(theirs)
    for cfg in (back, again):
        for f in dataclasses.fields(ours):
            expected = True if f.name == "inference_mode" else getattr(ours, f.name)
            got = getattr(cfg, f.name)
            if f.name == "target_modules":  # PEFT keeps a set: its files list it in hash order
                got, expected = sorted(got), sorted(expected)
            assert got == expected, f.name


def test_peft_config_object_passed_directly():
    """The issue's first line: inject_adapter(model, peft.LoraConfig(...)) used to fail on peft_type."""
    base = transformers.LlamaForCausalLM(llama_config()).eval()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_ext.inject_adapter(ours, cfg)
    stored = lora_ext.model.adapter_config(ours)
    assert stored.peft_type == "LORA" and stored.target_modules == ["q_proj", "v_proj"]
    pm = peft.get_peft_model(theirs, cfg).eval()
    randomize_lora(ours, seed=3)
    randomize_lora(pm, seed=3)
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_config_with_an_unsupported_feature_is_refused_before_mutation():
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"lora_bias=True.*accelerate"):
        lora_ext.inject_adapter(model, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    assert_unchanged(model, snap)


def test_field_of_a_newer_peft_warns_when_off_and_is_refused_when_on():
    data = lora_ext.LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    with pytest.warns(UserWarning, match="does not know.*future_feature") as record:
        cfg = lora_ext.LoraConfig.from_peft_dict({**data, "future_feature": None, "future_switch": False})
    assert len([w for w in record if "does not know" in str(w.message)]) == 1  # one warning for both
    assert cfg.target_modules == ["q_proj"]
    with pytest.raises(ValueError, match=r"newer PEFT.*future_feature=3"):
        lora_ext.LoraConfig.from_peft_dict({**data, "future_feature": 3})


def test_load_adapter_with_a_config_argument(tmp_path):
    base = transformers.LlamaForCausalLM(llama_config()).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(pm, seed=2)
    pm.save_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")  # the argument replaces the file
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"])
    model = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path), config=cfg)
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- task types


def _t5():
    cfg = transformers.T5Config(
        vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _bert_seq_cls():
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return transformers.BertForSequenceClassification(cfg)


TASKS = {
    # task: (model builder, target_modules, user modules_to_save)
    "CAUSAL_LM": (lambda: transformers.LlamaForCausalLM(llama_config()), LLAMA_TARGETS, None),
    "SEQ_CLS": (lambda: transformers.LlamaForSequenceClassification(llama_config(num_labels=3)), ["q_proj"], None),
    "SEQ_CLS_user_score": (
        lambda: transformers.LlamaForSequenceClassification(llama_config(num_labels=3)),
        ["q_proj", "v_proj"],
        ["score"],  # PEFT then writes modules_to_save=['score', 'classifier', 'score']
    ),
    "SEQ_CLS_bert": (_bert_seq_cls, ["query", "value"], None),
    "TOKEN_CLS": (lambda: transformers.LlamaForTokenClassification(llama_config(num_labels=5)), ["v_proj"], None),
    "SEQ_2_SEQ_LM": (_t5, ["q", "v"], None),
    "QUESTION_ANS": (lambda: transformers.LlamaForQuestionAnswering(llama_config()), ["q_proj", "o_proj"], None),
    "FEATURE_EXTRACTION": (lambda: transformers.LlamaModel(llama_config()), ["q_proj", "down_proj"], None),
}


def _outputs(model, ids):
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    kwargs = {"decoder_input_ids": ids[:, :5]} if seq2seq else {}
    out = model(input_ids=ids, **kwargs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("case", list(TASKS))
def test_adapter_saved_by_peft_with_a_task_type_loads_with_peft_outputs(case, tmp_path):
    task = case.split("_user")[0].removesuffix("_bert")
    build, targets, mts = TASKS[case]
    torch.manual_seed(0)
    base = build().eval()
    if base.config.pad_token_id is None:
        base.config.pad_token_id = 0  # sequence classification of a batch needs it
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=mts, task_type=task)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    randomize_lora(pm, seed=5)
    with torch.no_grad():  # the heads PEFT saves must differ from the base's, so a load that skips them fails
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == task
    ids = llama_ids()
    with torch.no_grad():
        expected = _outputs(pm, ids)
        ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path)).eval()
        got = _outputs(ours, ids)
        plain = _outputs(base, ids)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.allclose(got[k], plain[k]) for k in got)  # the adapter changes the outputs
    stored = lora_ext.model.adapter_config(ours)
    assert stored.task_type == task
    assert set(stored.modules_to_save or []) == set(saved["modules_to_save"] or [])
    assert len(stored.modules_to_save or []) == len(set(stored.modules_to_save or []))  # duplicates removed
    # and back: lora_ext's file of it loads in PEFT with the same outputs
    lora_ext.save_adapter(ours, str(tmp_path / "again"))
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
        for k, v in _outputs(again, ids).items():
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5)
    assert type(again).__name__ == type(pm).__name__  # task_type written back: the same PeftModel class


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_inject_with_a_task_type_trains_the_head_as_peft(task):
    build = {
        "SEQ_CLS": TASKS["SEQ_CLS"][0],
        "TOKEN_CLS": TASKS["TOKEN_CLS"][0],
        "QUESTION_ANS": TASKS["QUESTION_ANS"][0],
    }
    base = build[task]().eval()
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type=task)
    ours = lora_ext.inject_adapter(copy.deepcopy(base), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    theirs = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == theirs
    assert any(".modules_to_save." in n for n in theirs)


def test_modules_to_save_tolerance_matches_peft_where_it_should():
    base = transformers.LlamaForCausalLM(llama_config()).eval()
    # a task type's own entries that match nothing (no classifier/score here) are tolerated, as PEFT does
    lora_ext.inject_adapter(copy.deepcopy(base), lora_ext.LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"))
    # the user's own entry that matches nothing is tolerated as PEFT tolerates it, with one warning (a typo is seen)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['scroe'\] match no module"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=["q_proj"], modules_to_save=["scroe"]))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["scroe"]))
    theirs = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == theirs


def test_load_refuses_head_weights_the_model_lacks(tmp_path):
    """Tolerance covers names, never tensors: a file's head weights with no module to go to are refused."""
    torch.manual_seed(0)
    cls = transformers.LlamaForSequenceClassification(llama_config(num_labels=3))
    cls.config.pad_token_id = 0
    pm = peft.get_peft_model(cls, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    pm.save_pretrained(str(tmp_path))
    model = transformers.LlamaForCausalLM(llama_config())  # no "score" head
    snap = snapshot(model)
    with pytest.raises(ValueError, match="score"):
        lora_ext.load_adapter(model, str(tmp_path))
    assert_unchanged(model, snap)
