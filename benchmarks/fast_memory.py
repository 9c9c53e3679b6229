"""Peak resident memory of loading a checkpoint into 4 bits, and activation memory of checkpointing.

    python -m benchmarks.fast_memory [--out DIR]

Two measurements behind BENCHMARKS.md's "Unsloth-style path" section and
tests/test_fast_memory.py:

- ``load``: a ~220 MB fp32 Llama (hidden 768, 6 layers, vocab 8000, 50 MB
  safetensors shards) is loaded in a fresh subprocess by each method; the peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
  imports) minus the resident set before the load is reported next to the
  model's own bytes.
- ``checkpointing``: bytes of the tensors autograd saves for the backward of one
  training step of a 4-layer Llama (tracked with ``saved_tensors_hooks``:
  each saved tensor's storage counted once), without checkpointing, with
  ``use_gradient_checkpointing=True``, with ``"unsloth"`` (offload forced on, as on
  a GPU: the kept inputs go to CPU memory), and with transformers' own
  ``activation_checkpointing_enable(offload=True)`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

LOAD_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 8000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
LOAD_METHODS = ("fast_4bit", "transformers_then_quantize_model", "transformers_fp32")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def save_load_model(folder: str) -> dict:
    """Build the ~220 MB fp32 Llama of :data:`LOAD_CONFIG` and save it in 50 MB shards; returns its sizes."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LOAD_CONFIG))
    model.save_pretrained(folder, max_shard_size="50MB")
    layer = model.model.layers[0]
    return {
        "fp32_bytes": sum(p.numel() * 4 for p in model.parameters()),
        "layer_fp32_bytes": sum(p.numel() * 4 for p in layer.parameters()),
        "largest_tensor_bytes": max(p.numel() * 4 for p in model.parameters()),
        "shards": len([f for f in os.listdir(folder) if f.endswith(".safetensors")]),
    }


def _load_worker(folder: str, method: str) -> dict:
    import gc

    import torch
    import transformers

    import lora_ext

    # Warm up the lazy imports (transformers' model code, accelerate, the tokenizer stack) with a tiny
    # load, so that the measured peak is the load alone.
    with tempfile.TemporaryDirectory() as tiny:
        small = {**LOAD_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64}  # fmt: skip
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)).save_pretrained(tiny)
        lora_ext.FastLanguageModel.from_pretrained(tiny, max_seq_length=512, load_in_4bit=True)
        lora_ext.quantize_model(transformers.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32))
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    before = _status("VmRSS")
    if method == "fast_4bit":
        model, _ = lora_ext.FastLanguageModel.from_pretrained(folder, max_seq_length=512, load_in_4bit=True)
    elif method == "transformers_then_quantize_model":
        model = lora_ext.quantize_model(transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32))
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peak = _status("VmHWM")
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {
        "method": method,
        "rss_before": before,
        "peak_rss": peak,
        "peak_above_start": peak - before,
        "model_bytes": model_bytes,
        "hwm_reset": reset,
    }


def measure_load(folder: str, method: str) -> dict:
    """Run one load in a fresh interpreter (so earlier allocations do not count); returns its figures."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fast_memory", "--worker", folder, method],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load worker {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ checkpointing

CKPT_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


class SavedTensorTracker:
    """``saved_tensors_hooks`` that sum the bytes of the distinct storages autograd saves, by device."""

    def __init__(self):
        self.storages: dict[tuple, int] = {}

    def pack(self, t):
        key = (t.device.type, t.untyped_storage().data_ptr())
        self.storages[key] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    def bytes(self) -> int:
        return sum(self.storages.values())


def counting_save_on_cpu(tracker: SavedTensorTracker) -> type:
    """A ``save_on_cpu`` subclass whose pack hook records what it offloads in ``tracker``."""
    import torch

    class _Counting(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory=pin_memory, device_type=device_type)
            pack = self.pack_hook

            def counting(t):
                tracker.pack(t)
                return pack(t)

            self.pack_hook = counting

    return _Counting


def measure_checkpointing(batch: int = 4, seq: int = 512) -> list[dict]:
    """Saved-activation bytes of one training step per checkpointing mode (see the module docstring)."""
    import torch
    import transformers

    import lora_ext
    from lora_ext.fast import checkpointing

    rows = []
    for mode in ("none", "true", "unsloth_offload", "transformers_offload"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CKPT_CONFIG))
        lora_ext.FastLanguageModel.get_peft_model(model, r=16, lora_dropout=0.1, use_gradient_checkpointing=False)
        if mode == "true":
            checkpointing.enable_checkpointing(model, True)
        elif mode == "unsloth_offload":
            checkpointing.enable_checkpointing(model, "unsloth", offload=True)
        elif mode == "transformers_offload":
            model.activation_checkpointing_enable(offload=True)
        model.train()
        ids = torch.randint(0, CKPT_CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
        tracker = SavedTensorTracker()
        # Outermost hooks: they see what autograd saves outside the checkpointed layers and the inputs each
        # checkpoint keeps (its save_for_backward); under offload, save_on_cpu sees those inputs instead.
        offloaded = SavedTensorTracker()
        counting = counting_save_on_cpu(offloaded)
        import transformers.modeling_utils as hf_modeling  # imports save_on_cpu by name

        patched = [(torch.autograd.graph, "save_on_cpu"), (hf_modeling, "save_on_cpu")]
        saved = [(mod, name, getattr(mod, name, None)) for mod, name in patched]
        for mod, name in patched:
            setattr(mod, name, counting)
        try:
            with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
                loss = model(input_ids=ids, labels=ids).loss
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            held = sum(n for (dev, ptr), n in tracker.storages.items() if ptr not in params)
            loss.backward()
        finally:
            for mod, name, value in saved:
                setattr(mod, name, value)
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "seq": seq,
                "saved_bytes_outside_offload": held,
                "offloaded_bytes": offloaded.bytes(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder for fast_memory.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_load_worker(*args.worker)))
        return
    with tempfile.TemporaryDirectory() as folder:
        sizes = save_load_model(folder)
        loads = [measure_load(folder, m) for m in LOAD_METHODS]
    result = {"model": sizes, "load": loads, "checkpointing": measure_checkpointing()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fast_memory.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
