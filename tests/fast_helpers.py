"""Local checkpoints for the Unsloth-style API tests (tests/test_fast_*.py): no network."""

from __future__ import annotations

import os

import pytest
import torch

NOTEBOOK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level fast tokenizer (``w0 w1 ...``), built and saved without any download."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]", eos_token="w1"
    )
    fast.save_pretrained(folder)


def save_model(model: torch.nn.Module, folder: str, *, tokenizer: bool, shard: str = "50KB") -> str:
    """``model.save_pretrained`` (sharded safetensors), plus a tokenizer when asked; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=shard)
    if tokenizer:
        save_tokenizer(folder, model.config.get_text_config().vocab_size)
    return folder
