"""Micro-benchmark of the fused CPU kernel variants (csrc/cpu/kernels), per variant.

    python -m benchmarks.bench_cpu_kernels [--repeats 3] [--quick] [--variants default,avx2]

For each variant this CPU runs (plus ``aten``, the fused kernels off), in one process:

  * lora_linear forward + backward (grads of x, A, B; W frozen) at M = 8192 and 1024,
    K = N = 1024, r = 16, fp32, against the frozen base (F.linear forward + grad of x
    only) and a PEFT-style unfused layer (x W^T + s (x A^T) B^T with torch ops);
  * merge_ of a 4096 x 4096 W, r = 16 and 64, fp32 / bf16 / fp16, against the copy floor
    (``dst.copy_(W)``, the same bytes) and ``W.addmm_(B, A)``.

Timings are noisy on a shared machine, so every figure is a ratio to a baseline measured
in the same round: contenders run interleaved (one call each, in turn), a round takes the
minimum of ``--calls`` calls per contender, and the report shows min / median over
``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F


def _lora_ext():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        import lora_ext
        from lora_ext.ops import _loader
    if _loader._C is None:
        raise SystemExit("lora_ext: compiled extension not loaded; build it first")
    return lora_ext, _loader._C


def _round(contenders: dict, calls: int) -> dict:
    """One round: each contender `calls` times, interleaved; min seconds per contender."""
    for fn in contenders.values():  # warm-up
        fn()
    best = {k: float("inf") for k in contenders}
    for _ in range(calls):
        for k, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _with_variant(C, name, fn):
    def run():
        C.set_cpu_kernel(name)
        fn()

    return run


def _report(title: str, rounds: list[dict], baseline: str) -> None:
    print(f"\n{title}  (ratio to {baseline}; min / median over {len(rounds)} rounds; ms = min)")
    for k in rounds[0]:
        ratios = [r[k] / r[baseline] for r in rounds]
        ms = min(r[k] for r in rounds) * 1e3
        print(f"  {k:<22} {ms:9.2f} ms   x{min(ratios):6.3f} / x{statistics.median(ratios):6.3f}")


def bench_linear(C, lora_ext, variants, M, K, N, r, repeats, calls):
    torch.manual_seed(0)
    s = 2.0
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K) / K**0.5
    a = (torch.randn(r, K) / K**0.5).requires_grad_(True)
    b = (torch.randn(N, r) / r**0.5).requires_grad_(True)
    g = torch.randn(M, N)

    def base():
        x.grad = None
        F.linear(x, w).backward(g)

    def peft():
        x.grad = a.grad = b.grad = None
        (F.linear(x, w) + (x @ a.t()) @ b.t() * s).backward(g)

    def ours():
        x.grad = a.grad = b.grad = None
        lora_ext.lora_linear(x, w, a, b, s).backward(g)

    contenders = {"frozen base": base, "peft unfused": peft}
    for v in variants:
        contenders[f"lora_ext[{v}]"] = _with_variant(C, v, ours)
    plan = lora_ext.strategy_plan(M, N, K, torch.float32)
    rounds = [_round(contenders, calls) for _ in range(repeats)]
    _report(f"fwd+bwd fp32 M={M} K={K} N={N} r={r} (plan {plan})", rounds, "frozen base")
    return rounds


def bench_merge(C, lora_ext, variants, N, K, r, dtype, repeats, calls):
    torch.manual_seed(0)
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    src = w.clone()
    dst = torch.empty_like(w)
    a = (torch.randn(r, K) / K**0.5).to(dtype)
    b = (torch.randn(N, r) / r**0.5 * 1e-3).to(dtype)
    contenders = {
        "copy_ (floor)": lambda: dst.copy_(src),
        "addmm_": lambda: w.addmm_(b, a),
    }
    for v in variants:
        contenders[f"merge_[{v}]"] = _with_variant(C, v, lambda: lora_ext.merge_(w, a, b, 0.5))
    rounds = [_round(contenders, calls) for _ in range(repeats)]
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    _report(
        f"merge_ {name} W {N}x{K} r={r} (copy floor moves {2 * N * K * w.element_size() / 2**20:.0f} MiB)",
        rounds,
        "copy_ (floor)",
    )
    for v in variants:
        k = f"merge_[{v}]"
        bw = [r["copy_ (floor)"] / r[k] for r in rounds]
        vs = [r[k] / r["addmm_"] for r in rounds]
        print(f"  {k:<22} {100 * statistics.median(bw):5.1f} % of copy bandwidth, x{statistics.median(vs):.3f} addmm_")
    return rounds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="calls per contender per round (the round keeps the min)")
    ap.add_argument("--variants", default="", help="comma list (default: every runnable variant, then aten)")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = ap.parse_args(argv)
    lora_ext, C = _lora_ext()
    runnable = C.cpu_kernel_variants()
    variants = [v for v in (args.variants.split(",") if args.variants else ["avx512", "avx2", "default", "aten"]) if v]
    skipped = [v for v in variants if not runnable.get(v, False)]
    variants = [v for v in variants if runnable.get(v, False)]
    before = C.cpu_kernel()
    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}, auto variant {before}"
    )
    if skipped:
        print(f"variants this CPU cannot run (skipped): {', '.join(skipped)}")
    try:
        if args.quick:
            bench_linear(C, lora_ext, variants, 512, 256, 256, 16, args.repeats, args.calls)
            bench_merge(C, lora_ext, variants, 512, 512, 16, torch.float32, args.repeats, args.calls)
            return
        for M in (8192, 1024):
            bench_linear(C, lora_ext, variants, M, 1024, 1024, 16, args.repeats, args.calls)
        for r in (16, 64):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                bench_merge(C, lora_ext, variants, 4096, 4096, r, dtype, args.repeats, args.calls)
    finally:
        C.set_cpu_kernel(before)


if __name__ == "__main__":
    main()
