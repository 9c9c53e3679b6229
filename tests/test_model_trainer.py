"""transformers.Trainer on an injected model: adapter-only checkpoints in PEFT's format, resume, best model.

Also Trainer on a PEFT model accelerated by lora_ext.integrations.peft.accelerate.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from model_helpers import llama_config, llama_ids

import lora_ext

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TARGETS = ["q_proj", "v_proj", "down_proj"]


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 12):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, 128, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _base():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config())


def _injected(base, seed: int = 1, **kwargs):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    return lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs))


def _args(out, **kwargs):
    defaults = dict(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=3,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**defaults, **kwargs})


def _trainer(model, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Trainer(
            model=model, args=_args(out, **kwargs), train_dataset=_Data(), eval_dataset=_Data(8)
        )


def _lora_values(model) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n
    }


def _assert_adapter_only(path):
    files = set(os.listdir(path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    keys = set(safetensors_torch.load_file(os.path.join(path, "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys), sorted(keys)[:4]
    assert not any("base_layer" in k for k in keys)
    return keys


def test_trainer_checkpoints_and_save_model_are_peft_adapters(tmp_path):
    base = _base()
    model = _injected(base)
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for path in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        _assert_adapter_only(path)
    assert sorted(json.loads((tmp_path / "final" / "adapter_config.json").read_text())["target_modules"]) == sorted(
        TARGETS
    )
    saved = safetensors_torch.load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    for k, v in lora_ext.model.adapter_state_dict(model).items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    model.eval()
    ids = llama_ids()
    with torch.no_grad():
        trained = model(ids).logits
        assert not torch.allclose(trained, base.eval()(ids).logits)  # training changed something
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "final")).eval()
        torch.testing.assert_close(pm(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
        ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "final"))
        torch.testing.assert_close(ours.eval()(ids).logits, trained, rtol=0, atol=0)


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    base = _base()
    straight = _injected(base)
    _trainer(straight, tmp_path / "a").train()
    expected = _lora_values(straight)

    resumed = _injected(base, seed=99)  # other initial factors: only a real restore can give run a's result
    before = _lora_values(resumed)
    assert any(not torch.equal(before[k], expected[k]) for k in expected)
    trainer = _trainer(resumed, tmp_path / "a")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    got = _lora_values(resumed)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert trainer.state.global_step == 4


def test_load_best_model_at_end(tmp_path):
    model = _injected(_base())
    trainer = _trainer(
        model, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss"
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    _assert_adapter_only(best)
    saved = safetensors_torch.load_file(os.path.join(best, "adapter_model.safetensors"))
    for k, v in lora_ext.model.adapter_state_dict(model).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def test_save_pretrained_of_an_injected_model(tmp_path):
    """Several adapters in PEFT's layout (non-default ones in a sub-folder); unload restores the model's own."""
    base = _base()
    model = _injected(base)
    torch.manual_seed(5)
    lora_ext.inject_adapter(
        model, lora_ext.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "other"
    )
    model.save_pretrained(str(tmp_path / "all"))
    _assert_adapter_only(tmp_path / "all")
    _assert_adapter_only(tmp_path / "all" / "other")
    with pytest.raises(TypeError, match="push_to_hub=True"):
        model.save_pretrained(str(tmp_path / "hub"), push_to_hub=True)
    with pytest.raises(ValueError, match="unknown adapters"):
        model.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])
    twin = copy.deepcopy(model)  # the copy's save_pretrained saves the copy
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if ".lora_B.default" in n:
                p.add_(1.0)
    twin.save_pretrained(str(tmp_path / "twin"))
    a = safetensors_torch.load_file(str(tmp_path / "all" / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "twin" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    lora_ext.unload(model)
    model.save_pretrained(str(tmp_path / "plain"))
    assert "model.safetensors" in os.listdir(tmp_path / "plain")  # transformers' own again


def test_other_models_keep_trainers_own_resume(tmp_path):
    """The wrapped loaders leave a model without lora_ext adapters to Trainer's own code."""
    _injected(_base())  # installs the wrappers
    assert getattr(transformers.Trainer._load_from_checkpoint, "_lora_ext_wrapped", False)
    plain = _base()
    _trainer(plain, tmp_path / "p", max_steps=2, save_steps=2).train()
    assert "model.safetensors" in os.listdir(tmp_path / "p" / "checkpoint-2")
    again = _base()
    trainer = _trainer(again, tmp_path / "p", max_steps=2, save_steps=2)
    trainer._load_from_checkpoint(str(tmp_path / "p" / "checkpoint-2"))
    for (n, p), (_, q) in zip(again.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_trainer_with_an_accelerated_peft_model(tmp_path):
    base = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        lora_ext.integrations.peft.accelerate(pm)
    assert any(type(m).__name__ == "FusedLoraLinear" for m in pm.modules())
    _trainer(pm, tmp_path / "run").train()
    expected = _lora_values(pm)
    _assert_adapter_only(tmp_path / "run" / "checkpoint-4")
    pm.eval()
    ids = llama_ids()
    with torch.no_grad():
        ours = lora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "run" / "checkpoint-4")).eval()
        torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # resume of the accelerated model goes through PEFT's own path in Trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        lora_ext.integrations.peft.accelerate(pm2)
    _trainer(pm2, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    got = _lora_values(pm2)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_save_pretrained_takes_the_values_of_a_given_state_dict(tmp_path):
    """Trainer passes a gathered state_dict under FSDP/DeepSpeed: its values are the ones written."""
    model = _injected(_base())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if ".lora_A.default." in k)
    state[key] += 1.0
    model.save_pretrained(str(tmp_path), state_dict=state)
    saved = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    peft_key = "base_model.model." + key.replace(".default.", ".")
    torch.testing.assert_close(saved[peft_key], state[key], rtol=0, atol=0)
    assert not torch.equal(saved[peft_key], model.state_dict()[key])


def test_plain_from_pretrained_of_a_checkpoint_loads_base_and_adapter(tmp_path):
    """The checkpoint names its base (base_model_name_or_path), so transformers' from_pretrained finds both."""
    _base().save_pretrained(str(tmp_path / "base"))
    base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    model = _injected(base)
    _trainer(model, tmp_path / "run", max_steps=2, save_steps=2).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, base.eval()(ids).logits)
