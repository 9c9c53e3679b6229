"""FastLanguageModel (lora_ext/fast): Unsloth's notebook code on a local tiny Llama, 4-bit loading equal to
quantize_model(from_pretrained), refused/ignored arguments, seeded init, checkpointing (plain and with CPU
offload) with the gradients of the run without it, exactly reversible for_inference/for_training, the fused
path with dropout and biases, and parameter counts equal to PEFT's."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import IN_FALLBACK_MODE, run_in_fallback_mode
from fast_helpers import NOTEBOOK_TARGETS, save_model
from model_helpers import assert_close_dicts, llama_ids, lora_grads, randomize_lora, snapshot, tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext
from lora_ext import FastLanguageModel, LinearNF4, LoraLinear, LoraLinearNF4
from lora_ext.fast import checkpointing as fast_checkpointing

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny Llama (2 layers, hidden 64, 10 safetensors shards) with a tokenizer."""
    return save_model(tiny_llama(seed=1).float(), str(tmp_path_factory.mktemp("llama")), tokenizer=True)


@pytest.fixture(scope="module")
def folder_no_tokenizer(tmp_path_factory):
    return save_model(tiny_llama(seed=2), str(tmp_path_factory.mktemp("llama_bare")), tokenizer=False)


def _load(folder, **kwargs):
    kwargs.setdefault("max_seq_length", 64)
    kwargs.setdefault("device_map", "cpu")  # the comparisons below are against CPU fp32 models
    kwargs.setdefault("dtype", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a plain call
        return FastLanguageModel.from_pretrained(model_name=folder, **kwargs)


def _peft(model, **kwargs):
    kwargs.setdefault("target_modules", NOTEBOOK_TARGETS)
    kwargs.setdefault("use_gradient_checkpointing", False)
    return FastLanguageModel.get_peft_model(model, **kwargs)


# ------------------------------------------------------------------ the notebook


def test_notebook_code_runs(folder, capsys):
    with pytest.warns(UserWarning, match="max_seq_length=2048 exceeds the model's max_position_embeddings=64"):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=folder, max_seq_length=2048, dtype=None, load_in_4bit=True
        )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 32,768 || all params:")
    assert tokenizer.model_max_length == 2048
    batch = tokenizer(["w3 w4 w5 w6 w7 w8", "w9 w2 w3 w4 w5 w6"], return_tensors="pt")
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6, 7, 8], [9, 2, 3, 4, 5, 6]]
    batch = batch.to(model.device)  # the current CUDA device on a GPU machine
    ids = batch["input_ids"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    FastLanguageModel.for_inference(model)
    assert not model.training
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


# ------------------------------------------------------------------ loading


def test_4bit_load_equals_quantize_model_of_from_pretrained(folder):
    model, _ = _load(folder, load_in_4bit=True)
    ref = lora_ext.quantize_model(transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)).eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, LinearNF4))}
    assert kinds.pop("lm_head") == "Linear"  # the output head stays in full precision, as QLoRA
    assert set(kinds.values()) == {"LinearNF4"} and len(kinds) == 14
    assert all(m.double_quant and m.blocksize == 64 for m in model.modules() if isinstance(m, LinearNF4))
    assert not model.training
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_16bit_load_equals_from_pretrained(folder, dtype):
    model, _ = _load(folder, load_in_4bit=False, dtype=dtype)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    assert not any(isinstance(m, LinearNF4) for m in model.modules())
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert p.dtype == dtype and torch.equal(p, q), n


def test_tokenizer_when_the_folder_has_one(folder, folder_no_tokenizer):
    _, tok = _load(folder)
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)
    assert tok.model_max_length == 64
    assert tok("w5 w6")["input_ids"] == [5, 6]
    model, none = _load(folder_no_tokenizer)
    assert none is None and model.max_seq_length == 64


def test_bad_folders():
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repository"):
        FastLanguageModel.from_pretrained("/nonexistent/folder/of/a/model")


def test_bin_checkpoint_refused_for_4bit(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="reads safetensors checkpoints"):
        FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=64, device_map="cpu")


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"load_in_8bit": True}, "load_in_8bit=True"),
        ({"full_finetuning": True}, "full_finetuning=True"),
        ({"fast_inference": True}, "fast_inference=True"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"max_seq_length": 0}, "max_seq_length must be a positive integer"),
        ({"load_in_16bit": True}, "load_in_4bit and load_in_16bit are exclusive"),
        ({"device_map": {"a": "cpu", "b": "meta"}}, "several devices"),
    ],
)
def test_unsupported_load_arguments_are_refused(folder, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FastLanguageModel.from_pretrained(folder, **{"max_seq_length": 64, "device_map": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_device_map_refused_without_cuda(folder):
    with pytest.raises(ValueError, match="asks for CUDA but no CUDA device"):
        FastLanguageModel.from_pretrained(folder, max_seq_length=64, device_map="cuda:0")


def test_bad_types_are_type_errors(folder):
    with pytest.raises(TypeError, match="dtype must be None"):
        FastLanguageModel.from_pretrained(folder, max_seq_length=64, device_map="cpu", dtype=torch.int8)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        FastLanguageModel.from_pretrained(folder, max_seq_length=64, device_map="cpu", lod_in_4bit=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="device_map='auto' means something on a GPU machine")
def test_meaningless_arguments_accepted_with_one_warning(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = FastLanguageModel.from_pretrained(
            folder, max_seq_length=64, token="hf_xxx", device_map="auto", fix_tokenizer=False, max_lora_rank=32
        )
    mine = [w for w in caught if "lora_ext" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    assert mine[0].filename == __file__  # points at the caller
    for name in ("fix_tokenizer=False", "max_lora_rank=32", "token", "device_map='auto'"):
        assert name in str(mine[0].message)
    assert isinstance(model, transformers.LlamaForCausalLM)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"loftq_config": {"loftq_bits": 4}}, ValueError, "LoftQ"),
        ({"init_lora_weights": "loftq"}, ValueError, "LoftQ"),
        ({"use_dora": True}, ValueError, "use_dora=True"),
        ({"use_gradient_checkpointing": "yes"}, ValueError, "use_gradient_checkpointing must be"),
        ({"r": 0}, ValueError, "r \\(the rank\\) must be a positive integer"),
        ({"target_modules": ["q_proj", "nonexistent"]}, ValueError, "match no module"),
        ({"random_state": "seed"}, ValueError, "random_state must be an integer"),
        ({"lora_dropout_rate": 0.1}, TypeError, "unexpected keyword argument"),
    ],
)
def test_get_peft_model_refusals_leave_the_model_unchanged(folder, kwargs, exc, pattern):
    model, _ = _load(folder)
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        _peft(model, **kwargs)
    now = snapshot(model)
    assert now["structure"] == snap["structure"] and now["grad"] == snap["grad"] and now["state"] is None
    assert all(torch.equal(now["tensors"][k], v) for k, v in snap["tensors"].items())


def test_get_peft_model_ignored_argument_warns_at_the_caller(folder):
    model, _ = _load(folder)
    with pytest.warns(UserWarning, match="no effect here, ignored: max_seq_length=4096") as caught:
        _peft(model, max_seq_length=4096)
    assert caught[0].filename == __file__


def test_loftq_none_and_empty_dict_accepted(folder):
    for value in (None, {}):
        model, _ = _load(folder)
        _peft(model, loftq_config=value)


# ------------------------------------------------------------------ seeds


def _factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def test_random_state_seeds_the_adapter_init(folder):
    runs = []
    for seed in (3407, 3407, 7):
        model, _ = _load(folder)
        torch.manual_seed(99)
        rng_before = torch.get_rng_state()
        _peft(model, random_state=seed)
        assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is left alone
        runs.append(_factors(model))
    same, other = runs[0], runs[2]
    assert all(torch.equal(same[k], runs[1][k]) for k in same)
    a_keys = [k for k in same if ".lora_A." in k]
    assert a_keys and all(not torch.equal(same[k], other[k]) for k in a_keys)
    assert all(torch.count_nonzero(v) == 0 for k, v in same.items() if ".lora_B." in k)  # B = 0: model unchanged

    # The seed gives PEFT's init under the same torch.manual_seed (same RNG consumption order).
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(3407)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=16, target_modules=NOTEBOOK_TARGETS))
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in pm.named_parameters()}
    for k, v in same.items():
        if ".lora_A." in k:
            assert torch.equal(v, theirs[k.replace(".default", "")]), k


# ------------------------------------------------------------------ checkpointing


class _PackCounter:
    """Wraps lora_ext.fast.checkpointing._pack_to_cpu: counts the non-empty tensors it moves to host memory."""

    def __init__(self, monkeypatch):
        self.packed = 0
        real = fast_checkpointing._pack_to_cpu

        def pack(t):
            self.packed += t.numel() > 0  # (the non-reentrant checkpoint also saves an empty marker)
            device, packed = real(t)
            assert packed.data_ptr() != t.data_ptr() or t.numel() == 0  # a copy, not the tensor itself
            return device, packed

        monkeypatch.setattr(fast_checkpointing, "_pack_to_cpu", pack)


def _train_grads(folder, mode, offload=None, load_in_4bit=False):
    model, _ = _load(folder, load_in_4bit=load_in_4bit)
    _peft(model, lora_dropout=0.2, init_lora_weights=False, random_state=5)
    if mode is not False:
        fast_checkpointing.enable_checkpointing(model, mode, offload=offload)
    model.train()
    ids = llama_ids(batch=2, seq=12)
    torch.manual_seed(11)
    model(input_ids=ids, labels=ids).loss.backward()
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "self_attn")]
    return lora_grads(model), [m.gradient_checkpointing for m in layers]


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize(
    ("mode", "offload"), [(True, None), ("unsloth", None), ("unsloth", True)], ids=["true", "unsloth", "offload"]
)
def test_checkpointing_gives_the_gradients_of_the_plain_run(folder, monkeypatch, mode, offload, load_in_4bit):
    ref, flags = _train_grads(folder, False, load_in_4bit=load_in_4bit)
    assert flags == [False, False]
    counter = _PackCounter(monkeypatch)
    got, flags = _train_grads(folder, mode, offload, load_in_4bit=load_in_4bit)
    assert flags == [True, True]
    assert_close_dicts(got, ref, rtol=1e-5, atol=1e-7)
    assert all(torch.count_nonzero(g) > 0 for g in got.values())
    # The offload path moves exactly the hidden states each layer keeps (one tensor per layer); on a CPU model
    # "unsloth" is plain checkpointing, which offloads nothing.
    assert counter.packed == (2 if offload else 0)


def test_get_peft_model_enables_checkpointing(folder):
    for mode, expected in ((True, True), ("unsloth", True), (False, False)):
        model, _ = _load(folder)
        _peft(model, use_gradient_checkpointing=mode)
        assert model.model.layers[0].gradient_checkpointing is expected


def test_offloaded_checkpoint_is_plain_checkpoint_plus_cpu_copies():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 8))
    lora_ext.inject_adapter(
        lin, lora_ext.LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5, init_lora_weights=False)
    )
    x = torch.randn(4, 8, requires_grad=True)
    lin.train()
    torch.manual_seed(3)
    lin(x).square().sum().backward()
    ref = x.grad.clone()
    x.grad = None
    with pytest.MonkeyPatch.context() as mp:
        counter = _PackCounter(mp)
        torch.manual_seed(3)
        fast_checkpointing.offloaded_checkpoint(lin, x).square().sum().backward()
    assert counter.packed == 1
    torch.testing.assert_close(x.grad, ref, rtol=1e-6, atol=1e-7)


def test_checkpointing_refused_on_models_without_support():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not support transformers' gradient checkpointing"):
        fast_checkpointing.enable_checkpointing(net, True)
    with pytest.raises(ValueError, match="must be True, False or 'unsloth'"):
        fast_checkpointing.enable_checkpointing(net, "always")
    assert fast_checkpointing.enable_checkpointing(net, False) == "off"


# ------------------------------------------------------------------ fused path


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "nf4"])
def test_dropout_and_bias_stay_on_the_fused_op(folder, load_in_4bit):
    model, _ = _load(folder, load_in_4bit=load_in_4bit)
    _peft(model, lora_dropout=0.1, bias="lora_only")
    model.train()
    ids = llama_ids()
    with _OpRecorder() as rec:
        loss = model(input_ids=ids, labels=ids).loss
    # the dense op, or on the CPU the variant that keeps x A^T for the backward (csrc/autograd.cpp)
    fused = ("lora_ext.lora_linear_nf4",) if load_in_4bit else ("lora_ext.lora_linear", "lora_ext.lora_linear_xa")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14 and all(m.lora_dropout_p["default"] == 0.1 for m in layers)
    assert sum(rec.ops.count(op) for op in fused) == len(layers), sorted(set(rec.ops))
    loss.backward()
    biased = [m for m in layers if m.base_layer.bias is not None]
    assert all(m.base_layer.bias.grad is not None for m in biased)  # Llama has no biases: nothing to train


# ------------------------------------------------------------------ inference form


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("std", [0.01, 0.3], ids=["trained-size", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_for_inference_merges_and_for_training_restores_exactly(folder, dtype, std):
    model, _ = _load(folder, load_in_4bit=False, dtype=dtype)
    _peft(model, lora_dropout=0.1, random_state=1)
    randomize_lora(model, std=std)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = llama_ids()
    model.eval()
    unmerged = _outputs(model, ids)
    model.train()

    # A plain merge + unmerge does not give the weights back (so the check below can fail).
    probe = copy.deepcopy(model)
    lora_ext.merge_adapter(probe, exact=False)
    lora_ext.unmerge_adapter(probe)
    changed = sum(int((probe.state_dict()[k] != v).sum()) for k, v in before.items())
    assert changed > 0

    FastLanguageModel.for_inference(model)
    assert not model.training
    # merged exactly: the elements a plain round trip would not restore are recorded per layer
    assert all(m._merge_records for m in model.modules() if isinstance(m, LoraLinear))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.merged for m in layers)
    assert not any(p.requires_grad for p in model.parameters())
    merged = _outputs(model, ids)
    # The merged weights are merge_adapter's (one rounding of W + s·BA), so the outputs are merge_adapter's;
    # in fp32 they are also the unmerged outputs up to rounding.
    reference = copy.deepcopy(probe)
    reference.load_state_dict(before)
    lora_ext.merge_adapter(reference)
    torch.testing.assert_close(merged, _outputs(reference.eval(), ids), rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4 * unmerged.abs().max().item())
    with pytest.raises(ValueError, match="already in inference form"):
        FastLanguageModel.for_inference(model)

    FastLanguageModel.for_training(model)
    assert model.training and not any(m.merged for m in layers)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} not restored bit for bit"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    model.eval()
    assert torch.equal(_outputs(model, ids), unmerged)


@pytest.mark.parametrize("merge", ["auto", "all"])
def test_for_inference_on_a_4bit_model(folder, merge):
    model, _ = _load(folder)
    _peft(model)
    randomize_lora(model, std=0.3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = llama_ids()
    model.eval()
    unmerged = _outputs(model, ids)
    model.train()
    FastLanguageModel.for_inference(model, merge=merge)
    layers = [m for m in model.modules() if isinstance(m, LoraLinearNF4)]
    if merge == "auto":  # stays 4-bit: merging would dequantize every layer to full precision
        assert not any(m.merged for m in layers) and all(isinstance(m.base_layer, LinearNF4) for m in layers)
        assert torch.equal(_outputs(model, ids), unmerged)
    else:
        assert all(m.merged and type(m.base_layer) is nn.Linear for m in layers)
        torch.testing.assert_close(_outputs(model, ids), unmerged, rtol=0, atol=1e-4 * unmerged.abs().max().item())
    FastLanguageModel.for_training(model)
    assert all(isinstance(m.base_layer, LinearNF4) for m in layers)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_for_inference_refusals(folder):
    model, _ = _load(folder, load_in_4bit=False)
    _peft(model)
    with pytest.raises(ValueError, match="merge must be one of"):
        FastLanguageModel.for_inference(model, merge="yes")
    lora_ext.merge_adapter(model)
    with pytest.raises(ValueError, match="already merged"):
        FastLanguageModel.for_inference(model)
    lora_ext.unmerge_adapter(model)
    assert FastLanguageModel.for_training(model) is model and model.training  # never went to inference: train()


# ------------------------------------------------------------------ parameter accounting


def _llama2_7b_on_meta():
    cfg = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize(
    ("targets", "expected"), [(["q_proj", "v_proj"], 8_388_608), (NOTEBOOK_TARGETS, 39_976_960)], ids=["qv", "all7"]
)
def test_print_trainable_parameters_equals_peft_on_llama2_7b(capsys, targets, expected):
    peft = pytest.importorskip("peft")
    ours = _llama2_7b_on_meta()
    FastLanguageModel.get_peft_model(ours, r=16, target_modules=targets, use_gradient_checkpointing=False)
    ours.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_llama2_7b_on_meta(), peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    pm.print_trainable_parameters()
    assert line == capsys.readouterr().out.strip()
    assert lora_ext.trainable_parameters(ours)[0] == expected
    # r·(d_in + d_out) per layer: q and v of Llama-2-7B are 4096 x 4096, gate/up/down 4096 <-> 11008.
    assert expected == 32 * 16 * sum({"q_proj": 8192, "k_proj": 8192, "v_proj": 8192, "o_proj": 8192,
                                      "gate_proj": 15104, "up_proj": 15104, "down_proj": 15104}[t] for t in targets)  # fmt: skip


def test_4bit_parameter_count_is_the_unquantized_count(folder):
    """A packed NF4 byte holds two weights: counted as two parameters, as PEFT counts bitsandbytes' Params4bit."""
    q, _ = _load(folder)
    dense, _ = _load(folder, load_in_4bit=False)
    assert lora_ext.trainable_parameters(q)[1] == lora_ext.trainable_parameters(dense)[1]


# ------------------------------------------------------------------ fallback


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
def test_fast_language_model_passes_on_the_fallback():
    tail = run_in_fallback_mode(
        ["tests/test_fast_language.py", "-k", "notebook or equals_quantize or restores_exactly or 4bit_model"],
        timeout=900,
    )
    assert " passed" in tail and "failed" not in tail


def _tampered(tmp_path, edit):
    """A single-file checkpoint of the tiny Llama with ``edit(state_dict)`` applied."""
    from safetensors.torch import save_file

    model = tiny_llama(seed=4)
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}), "tensors the model does not know"),
        (lambda s: s.pop("model.layers.1.mlp.down_proj.weight"), "no weights for the linear layers"),
        (lambda s: s.pop("model.norm.weight"), "no tensors for \\['model.norm.weight'\\]"),
        (lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 63)}), "has shape \\[64, 63\\]"),
    ],
    ids=["unknown", "missing-linear", "missing-norm", "shape"],
)
def test_4bit_load_checkpoint_errors(tmp_path, edit, pattern):
    folder = _tampered(tmp_path, edit)
    with pytest.raises(ValueError, match=pattern):
        FastLanguageModel.from_pretrained(folder, max_seq_length=64, device_map="cpu")


def test_4bit_load_truncated_file(tmp_path):
    folder = _tampered(tmp_path, lambda s: None)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is truncated"):
        FastLanguageModel.from_pretrained(folder, max_seq_length=64, device_map="cpu")


def test_4bit_load_tied_embeddings(tmp_path):
    folder = save_model(tiny_llama(seed=5, tie_word_embeddings=True), str(tmp_path), tokenizer=False)
    model, _ = _load(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the head stays full precision and tied
    ref = lora_ext.quantize_model(transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)).eval()
    ids = llama_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
