"""QLoRA on CPU: lora_ext.lora_linear_nf4 against bitsandbytes Linear4bit + a PEFT LoRA branch,
and the storage cost of NF4 weights.

Usage: python -m benchmarks.bench_nf4 [--m 512] [--k 1024] [--n 1024] [--r 16] [--dtype fp32] [--reps 5]

For one layer shape, side by side in one process (interleaved, median of --reps):

  base        F.linear(x, W) with the full-precision W frozen: the floor
  bnb+peft    bitsandbytes Linear4bit (nf4, double quant, compute dtype = x's) plus
              PEFT's branch ``lora_B(lora_A(x)) * scaling`` (what peft.get_peft_model builds)
  lora_ext    lora_ext.lora_linear_nf4 (compiled CPU kernel if loaded, else the fallback)

"fwd+bwd" is one training step of the layer: x, A, B require grad, W frozen.
Every time is also given as a ratio to ``base`` measured in the same run.
Memory: bits per parameter of the quantized weight (memory_report) for the
layer and for a 4096 x 4096 layer (the QLoRA paper's 4.127 figure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lora_ext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    m, k, n, r = args.m, args.k, args.n, args.r
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_()
    b = (torch.randn(n, r) / r**0.5).to(dtype).requires_grad_()
    g = torch.randn(m, n, dtype=dtype)
    qw = lora_ext.quantize_nf4(w, 64, True)

    runs = {}

    def base():
        F.linear(x, w).backward(g)

    def ours():
        lora_ext.lora_linear_nf4(x, qw, a, b, 2.0).backward(g)

    runs["base"] = base
    runs["lora_ext"] = ours
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        layer = layer.to("cpu")

        def bnb_peft():
            y = layer(x) + F.linear(F.linear(x, a), b) * 2.0
            y.backward(g)

        runs["bnb+peft"] = bnb_peft
    except Exception as exc:  # pragma: no cover - reported, not fatal
        print(f"bitsandbytes path skipped: {exc}")

    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch._dynamo.config.patch(disable=True):
        for _ in range(args.reps):
            for name, fn in runs.items():
                times[name] += _time(fn, 1)
    med = {name: statistics.median(t) for name, t in times.items()}
    info = lora_ext.build_info()
    print(f"# NF4 LoRA fwd+bwd on CPU, {args.dtype}, M={m} K={k} N={n} r={r}, threads={torch.get_num_threads()}, "
          f"extension_loaded={info['extension_loaded']}, torch {torch.__version__}")  # fmt: skip
    print("| path | median ms | ratio to base | ratio to bnb+peft |")
    print("| --- | --- | --- | --- |")
    for name, t in med.items():
        rb = f"{t / med['bnb+peft']:.2f}" if "bnb+peft" in med else "n/a"
        print(f"| {name} | {t * 1e3:.1f} | {t / med['base']:.2f} | {rb} |")

    rep = lora_ext.memory_report(lora_ext.LinearNF4.from_nf4(qw))
    big = lora_ext.memory_report(lora_ext.LinearNF4.from_linear(torch.nn.Linear(4096, 4096, bias=False)))
    print(f"\nbits/param (blocksize 64, double quant): {n}x{k} layer {rep['quantized_bits_per_param']:.4f}, "
          f"4096x4096 layer {big['quantized_bits_per_param']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
