"""GPU benchmark of the lora_ext CUDA kernels (run by benchmarks/gpu_check.sh).

For one shape (default bf16, M=8192, K=N=4096) and each rank, side by side in
one process:

  base        F.linear(x, W, bias) with W and bias frozen: the floor
  peft        the PEFT LoRA layer: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``
              (peft's own ``lora.Linear`` when peft is importable, else that exact formula)
  fused[s]    lora_ext.lora_linear for each strategy s (shrink_expand, merge, auto)
  fused_drop  lora_ext.lora_linear with dropout_p = 0.1 (always shrink_expand)

Timings are medians of CUDA-event intervals after warm-up, rotating through
several input buffers so no iteration reads inputs left in L2 by the previous
one. "forward" is inference (torch.no_grad); "fwd+bwd" is a training step of
one layer (x and the adapter require grad, W and bias frozen). Every number is
also reported as a ratio to `base` of the same pass, measured in the same run.
Peak memory is the allocator's peak during one training step above what was
allocated before it. merge_ is compared with a device-to-device copy of W
(both move 2 * N * K elements).

Writes results.json, results.csv and results.md into --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import lora_ext

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_time_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` CUDA-event intervals after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Rotating:
    """Cycles through n preallocated tensors made by make()."""

    def __init__(self, make, n: int):
        self.items = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def make_peft_layer(base: torch.nn.Linear, r: int, alpha: float, dropout: float):
    """peft's lora.Linear around `base` if peft is importable, else None."""
    try:
        from peft.tuners.lora import Linear as PeftLinear
        from peft.tuners.lora import LoraConfig
    except Exception:  # noqa: BLE001  (peft missing or incompatible with this torch)
        return None
    kwargs = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}
    try:  # peft >= 0.18 also takes the LoraConfig; older versions only the keywords
        return PeftLinear(base, "default", config=LoraConfig(**kwargs), **kwargs)
    except TypeError:
        pass
    try:
        return PeftLinear(base, "default", **kwargs)
    except TypeError:
        return None


def gpu_environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "lora_ext_build": {k: v for k, v in lora_ext.build_info().items()},
    }
    try:
        env["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    try:
        import peft

        env["peft"] = peft.__version__
    except Exception:  # noqa: BLE001
        env["peft"] = None
    return env


def _with_chunk_rows(rows: int, fn):
    """Runs fn() (the forward, and later the backward it records) with LORA_EXT_CUDA_CHUNK_ROWS = rows."""

    class _Env(torch.autograd.Function):
        # Sets the variable around the backward too, which runs after fn() has returned.
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            os.environ["LORA_EXT_CUDA_CHUNK_ROWS"] = str(rows)
            return g

    os.environ["LORA_EXT_CUDA_CHUNK_ROWS"] = str(rows)
    try:
        y = fn()
    finally:
        os.environ.pop("LORA_EXT_CUDA_CHUNK_ROWS", None)
    return _Env.apply(y) if y.requires_grad else y


def bench_rank(args, dtype, r: int) -> list[dict]:
    m, k, n = args.m, args.k, args.n
    dev = "cuda"
    scale = 2.0  # lora_alpha / r with lora_alpha = 2r
    torch.manual_seed(0)
    weight = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    lora_A = (torch.randn(r, k, device=dev, dtype=dtype) / k**0.5).requires_grad_(True)
    lora_B = (torch.randn(n, r, device=dev, dtype=dtype) / r**0.5).requires_grad_(True)
    xs = Rotating(lambda: torch.randn(m, k, device=dev, dtype=dtype), args.rotate)
    gs = Rotating(lambda: torch.randn(m, n, device=dev, dtype=dtype), args.rotate)

    base = torch.nn.Linear(k, n, bias=True, device=dev, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    base.requires_grad_(False)
    peft_layer = make_peft_layer(base, r, 2.0 * r, 0.0)
    peft_impl = "peft.tuners.lora.Linear" if peft_layer is not None else "formula"
    if peft_layer is not None:
        peft_layer = peft_layer.to(device=dev, dtype=dtype)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(lora_A)
            peft_layer.lora_B["default"].weight.copy_(lora_B)
        peft_params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    else:
        pa = torch.nn.Linear(k, r, bias=False, device=dev, dtype=dtype)
        pb = torch.nn.Linear(r, n, bias=False, device=dev, dtype=dtype)
        with torch.no_grad():
            pa.weight.copy_(lora_A)
            pb.weight.copy_(lora_B)
        dropout = torch.nn.Identity()  # PEFT uses nn.Identity for lora_dropout == 0
        peft_params = [pa.weight, pb.weight]

        def peft_layer(x):
            return base(x) + pb(pa(dropout(x))) * scale

    variants = {
        "base": lambda x: F.linear(x, weight, bias),
        "peft": peft_layer,
    }
    for strategy in ("shrink_expand", "merge", "auto"):
        variants[f"fused[{strategy}]"] = lambda x, s=strategy: lora_ext.lora_linear(
            x, weight, lora_A, lora_B, scale, bias=bias, strategy=s
        )
    variants["fused_drop0.1"] = lambda x: lora_ext.lora_linear(
        x, weight, lora_A, lora_B, scale, bias=bias, dropout_p=0.1
    )
    # Row-chunk size of the backward's low-rank passes (LORA_EXT_CUDA_CHUNK_ROWS), to set
    # the L2-sized default from measurement; m rows = no chunking.
    for chunk in args.chunk_rows:
        variants[f"fused[shrink_expand,chunk={chunk}]"] = lambda x, chunk=chunk: _with_chunk_rows(
            chunk, lambda: lora_ext.lora_linear(x, weight, lora_A, lora_B, scale, bias=bias, strategy="shrink_expand")
        )
    params = {name: [lora_A, lora_B] for name in variants}
    params["base"] = []
    params["peft"] = peft_params

    rows = []
    for name, fn in variants.items():

        def forward(fn=fn):
            with torch.no_grad():
                fn(xs.next())

        def train_step(fn=fn, name=name):
            x = xs.next().requires_grad_(True)
            fn(x).backward(gs.next())
            os.environ.pop("LORA_EXT_CUDA_CHUNK_ROWS", None)  # set by the chunk-size variants' backward
            x.requires_grad_(False)
            x.grad = None
            for p in params[name]:
                p.grad = None

        fwd = cuda_time_ms(forward, args.iters, args.warmup)
        step = cuda_time_ms(train_step, args.iters, args.warmup)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        rows.append({"variant": name, "r": r, "forward_ms": fwd, "fwd_bwd_ms": step, "step_peak_mib": peak / 2**20})
        print(
            f"  r={r:3d} {name:22s} forward {fwd:8.3f} ms   fwd+bwd {step:8.3f} ms   peak {peak / 2**20:8.1f} MiB",
            flush=True,
        )

    base_row = rows[0]
    for row in rows:
        row["forward_ratio"] = row["forward_ms"] / base_row["forward_ms"]
        row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / base_row["fwd_bwd_ms"]
        row["peak_over_base_mib"] = row["step_peak_mib"] - base_row["step_peak_mib"]
        row["peft_impl"] = peft_impl
        row["plan"] = lora_ext.strategy_plan(m, n, k, dtype) if row["variant"] == "fused[auto]" else None
    # O(M r) budget for the peak-memory goal, in MiB: a few fp32 [M, r] intermediates.
    for row in rows:
        row["m_r_fp32_mib"] = m * r * 4 / 2**20
    return rows


def bench_merge(args, dtype, n: int, k: int, r: int) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    dst = torch.empty_like(w)
    a = torch.randn(r, k, device="cuda", dtype=dtype) / k**0.5
    b = torch.randn(n, r, device="cuda", dtype=dtype) / r**0.5
    sign = [1.0]

    def merge():
        lora_ext.merge_(w, a, b, 1e-3 * sign[0])  # alternate signs: W stays put across iterations
        sign[0] = -sign[0]

    bytes_moved = 2 * w.numel() * w.element_size()
    t_merge = cuda_time_ms(merge, args.iters, args.warmup)
    t_merged = cuda_time_ms(lambda: lora_ext.merged_weight(w, a, b, 1e-3), args.iters, args.warmup)
    t_copy = cuda_time_ms(lambda: dst.copy_(w), args.iters, args.warmup)
    row = {
        "n": n,
        "k": k,
        "r": r,
        "merge_ms": t_merge,
        "merged_weight_ms": t_merged,
        "copy_ms": t_copy,
        "merge_gbps": bytes_moved / t_merge / 1e6,
        "copy_gbps": bytes_moved / t_copy / 1e6,
    }
    row["merge_vs_copy"] = row["merge_gbps"] / row["copy_gbps"]
    print(
        f"  merge_ W[{n}x{k}] r={r:3d}: {row['merge_gbps']:7.0f} GB/s  copy {row['copy_gbps']:7.0f} GB/s"
        f"  -> {100 * row['merge_vs_copy']:.1f} % of copy",
        flush=True,
    )
    return row


def write_outputs(out: str, env: dict, linear_rows: list[dict], merge_rows: list[dict], args) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(
            {"env": env, "args": vars(args), "linear": linear_rows, "merge": merge_rows}, fh, indent=2, default=str
        )
    with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
        keys = [
            "variant",
            "r",
            "forward_ms",
            "fwd_bwd_ms",
            "forward_ratio",
            "fwd_bwd_ratio",
            "step_peak_mib",
            "peak_over_base_mib",
        ]
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(linear_rows)
    lines = [
        f"GPU {env['gpu']} (driver {env.get('driver')}), torch {env['torch']} (CUDA {env['torch_cuda']}), "
        f"peft {env.get('peft')}, {env['date_utc']}",
        "",
        f"lora_linear, {args.dtype}, M={args.m}, K={args.k}, N={args.n}; medians of {args.iters} CUDA-event timings "
        f"after {args.warmup} warm-up calls, {args.rotate} rotating inputs; ratios to the frozen base F.linear of the same run.",
        "",
        "| r | variant | forward ms | × base | fwd+bwd ms | × base | step peak MiB | over base MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in linear_rows:
        lines.append(
            f"| {row['r']} | {row['variant']} | {row['forward_ms']:.3f} | {row['forward_ratio']:.3f} | "
            f"{row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_ratio']:.3f} | {row['step_peak_mib']:.1f} | {row['peak_over_base_mib']:.1f} |"
        )
    lines += [
        "",
        "merge_ (in place, read + write W) against a device-to-device copy of W (same bytes):",
        "",
        "| W | r | merge_ ms | merged_weight ms | copy ms | merge_ GB/s | copy GB/s | merge_ / copy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in merge_rows:
        lines.append(
            f"| {row['n']}x{row['k']} | {row['r']} | {row['merge_ms']:.4f} | {row['merged_weight_ms']:.4f} | "
            f"{row['copy_ms']:.4f} | {row['merge_gbps']:.0f} | {row['copy_gbps']:.0f} | {100 * row['merge_vs_copy']:.1f} % |"
        )
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rotate", type=int, default=3, help="distinct input buffers cycled through")
    parser.add_argument(
        "--chunk-rows",
        type=int,
        nargs="*",
        default=[512, 2048, 8192],
        help="LORA_EXT_CUDA_CHUNK_ROWS values timed for fused[shrink_expand]",
    )
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    info = lora_ext.build_info()
    if not info.get("cuda"):
        print(
            f"bench_gpu: lora_ext has no CUDA kernels ({info.get('load_error')}); refusing to time the fallback",
            file=sys.stderr,
        )
        return 2
    dtype = DTYPES[args.dtype]
    env = gpu_environment()
    print(json.dumps(env, indent=2, default=str), flush=True)
    linear_rows = []
    for r in args.ranks:
        linear_rows += bench_rank(args, dtype, r)
        torch.cuda.empty_cache()
    merge_rows = []
    for n, k in ((args.n, args.k), (2 * args.n, 2 * args.k)):
        for r in args.ranks:
            merge_rows.append(bench_merge(args, dtype, n, k, r))
    write_outputs(args.out, env, linear_rows, merge_rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
