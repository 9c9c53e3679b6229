"""Micro-benchmark of the fused CPU kernel variants (csrc/cpu/kernels), per variant.

    python -m benchmarks.bench_cpu_kernels [--repeats 3] [--quick] [--variants default,avx2]

For each variant this CPU runs (plus ``aten``, the fused kernels off), in one process:

  * lora_linear forward + backward (grads of x, A, B; W frozen) at M = 8192 and 1024,
    K = N = 1024, r = 16, fp32, against the frozen base (F.linear forward + grad of x
    only) and a PEFT-style unfused layer (x W^T + s (x A^T) B^T with torch ops);
  * merge_ of a 4096 x 4096 W, r = 16 and 64, fp32 / bf16 / fp16, against the copy floor
    (``dst.copy_(W)``, the same bytes) and ``W.addmm_(B, A)``;
  * with ``--strategy``, instead: the cost model's crossover. The forward (no grad) and the
    backward op (grads of x, A, B) with ``strategy`` forced to shrink_expand and to merge, at
    M = 128 ... 8192 rows, K = N = 1024 and 4096 (r = 16, fp32), the active variant; the
    report gives merge / shrink_expand per M, the measured crossover M (the smallest M from
    which merge stays faster) and the one the byte model of csrc/host/strategy.h predicts.

Timings are noisy on a shared machine, so every figure is a ratio to a baseline measured
in the same round: contenders run interleaved (one call each, in turn), a round takes the
minimum of ``--calls`` calls per contender, and the report shows min / median over
``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from .common import CPU_ISA_VARS, rerun_with_cpu_isa


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


def _crossover(ms: list[int], ratio: dict) -> int | None:
    """Smallest M from which merge stays faster (ratio merge / shrink_expand < 1), None if never."""
    best = None
    for m in reversed(ms):
        if ratio[m] >= 1.0:
            break
        best = m
    return best


def bench_strategy(C, lora_ext, K, N, r, ms, repeats, calls):
    """merge / shrink_expand per M for the forward and the backward op; crossovers measured and modelled."""
    ops = torch.ops.lora_ext
    torch.manual_seed(0)
    s = 2.0
    w = torch.randn(N, K) / K**0.5
    a = torch.randn(r, K) / K**0.5
    b = torch.randn(N, r) / r**0.5
    mask = [True, False, False, True, True]
    fwd_ratio, bwd_ratio = {}, {}
    print(
        f"\nstrategy crossover fp32 K={K} N={N} r={r}, variant {C.cpu_kernel()} (merge / shrink_expand, min / median)"
    )
    for M in ms:
        x = torch.randn(M, K)
        g = torch.randn(M, N)
        contenders = {
            "fwd shrink": lambda x=x: ops.lora_linear(x, w, None, a, b, s, 0.0, None, 1),
            "fwd merge": lambda x=x: ops.lora_linear(x, w, None, a, b, s, 0.0, None, 2),
            "bwd shrink": lambda x=x, g=g: ops.lora_linear_backward(g, x, w, a, b, s, 0.0, None, 1, mask),
            "bwd merge": lambda x=x, g=g: ops.lora_linear_backward(g, x, w, a, b, s, 0.0, None, 2, mask),
        }
        rounds = [_round(contenders, calls) for _ in range(repeats)]
        fr = [rd["fwd merge"] / rd["fwd shrink"] for rd in rounds]
        br = [rd["bwd merge"] / rd["bwd shrink"] for rd in rounds]
        fwd_ratio[M], bwd_ratio[M] = statistics.median(fr), statistics.median(br)
        plan = lora_ext.strategy_plan(M, N, K, torch.float32)
        print(
            f"  M={M:<6} fwd {min(rd['fwd shrink'] for rd in rounds) * 1e3:8.2f} ms  x{min(fr):5.3f} / x{fwd_ratio[M]:5.3f}"
            f"   bwd {min(rd['bwd shrink'] for rd in rounds) * 1e3:8.2f} ms  x{min(br):5.3f} / x{bwd_ratio[M]:5.3f}"
            f"   model: fwd {plan['forward']}, bwd {plan['backward']}"
        )
    model_fwd = next((m for m in ms if lora_ext.strategy_plan(m, N, K, torch.float32)["forward"] == "merge"), None)
    model_bwd = next((m for m in ms if lora_ext.strategy_plan(m, N, K, torch.float32)["backward"] == "merge"), None)
    print(
        f"  crossover (smallest M of the sweep from which merge stays faster): forward measured "
        f"{_crossover(ms, fwd_ratio)}, model {model_fwd}; backward measured {_crossover(ms, bwd_ratio)}, model {model_bwd}"
    )
    return fwd_ratio, bwd_ratio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="calls per contender per round (the round keeps the min)")
    ap.add_argument("--variants", default="", help="comma list (default: every runnable variant, then aten)")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--strategy", action="store_true", help="the cost model's crossover sweep instead (active variant)")
    ap.add_argument(
        "--cpu-isa",
        choices=("native", "avx2"),
        default="native",
        help="cap torch, MKL, oneDNN and the kernels' choice at this ISA (benchmarks/common.py: CPU_ISA_ENV)",
    )
    args = ap.parse_args(argv)
    if args.cpu_isa != "native":
        rerun_with_cpu_isa(args.cpu_isa, "benchmarks.bench_cpu_kernels", list(sys.argv[1:] if argv is None else argv))
    lora_ext, C = _lora_ext()
    runnable = C.cpu_kernel_variants()
    variants = [v for v in (args.variants.split(",") if args.variants else ["avx512", "avx2", "default", "aten"]) if v]
    skipped = [v for v in variants if not runnable.get(v, False)]
    variants = [v for v in variants if runnable.get(v, False)]
    before = C.cpu_kernel()
    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}, auto variant {before}"
        + "".join(f", {k}={os.environ[k]}" for k in CPU_ISA_VARS if os.environ.get(k))
    )
    if skipped:
        print(f"variants this CPU cannot run (skipped): {', '.join(skipped)}")
    try:
        if args.strategy:
            if args.quick:
                bench_strategy(C, lora_ext, 256, 256, 16, [64, 512], args.repeats, args.calls)
                return
            ms = [128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192]
            for k in (1024, 4096):
                bench_strategy(C, lora_ext, k, k, 16, ms if k == 1024 else ms[:-1], args.repeats, args.calls)
            return
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
