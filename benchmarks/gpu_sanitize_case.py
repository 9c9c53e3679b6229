"""A few calls of every CUDA op of lora_ext, for compute-sanitizer (run by benchmarks/gpu_check.sh).

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize_case.py [bf16,fp32,fp16,fp64]

Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: every tensor is then its own
cudaMalloc, so an out-of-bounds access hits the allocation's end (memcheck) and
a read of memory no kernel or copy wrote is seen as uninitialised (initcheck),
instead of landing in a block the caching allocator reuses.

Coverage: lora_linear and lora_linear_backward (shrink_expand and merge
strategies, dropout on and off, with and without bias, unaligned offset views,
an expanded grad_out), merge_ (16-byte vector path, scalar path, transposed and
offset weights), merged_weight, dropout_mask, nf4_dequantize (plain and
double-quantized, blocksizes 32 and 64, odd element counts), lora_linear_nf4 and
lora_linear_nf4_backward, lora_linear_mixed and lora_linear_mixed_backward. Shapes have tails everywhere: N = 67 is no multiple
of the merge kernel's 32-row tile, K = 129 (scalar path) and K = 264 (vector
path, no multiple of the 128/256-column tile); r = 40 is past the merge
kernel's rank chunk of 32, so its second chunk and the barriers between chunks
run (racecheck). Exits non-zero if an op raises (a failed launch raises) or
returns a non-finite value.
"""

from __future__ import annotations

import sys

import torch

import lora_ext

OPS = torch.ops.lora_ext
DEV = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "fp64": torch.float64}
# (M, K, N, r): scalar-path tails, r past the rank chunk on both paths, tall M, M = 1.
SHAPES = [(37, 129, 67, 5), (33, 129, 67, 40), (5, 264, 72, 40), (300, 96, 40, 8), (1, 264, 67, 3)]


def _finite(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.numel() and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SystemExit(f"non-finite output of shape {list(t.shape)} and dtype {t.dtype}")


def lora_ops(dtype: torch.dtype) -> None:
    """lora_linear, lora_linear_backward, merge_, merged_weight, dropout_mask."""
    seed = torch.tensor(17, device=DEV)
    for m, k, n, r in SHAPES:
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        w = torch.randn(n, k, device=DEV, dtype=dtype) / k**0.5
        a = torch.randn(r, k, device=DEV, dtype=dtype) / k**0.5
        b = torch.randn(n, r, device=DEV, dtype=dtype) / r**0.5
        bias = torch.randn(n, device=DEV, dtype=dtype)
        g = torch.randn(m, n, device=DEV, dtype=dtype)
        for strategy in (1, 2):
            for p, s in ((0.0, None), (0.3, seed)):
                for bb in (bias, None):
                    _finite(OPS.lora_linear(x, w, bb, a, b, 1.5, p, s, strategy))
                _finite(*OPS.lora_linear_backward(g, x, w, a, b, 1.5, p, s, strategy, [True] * 5))
            _finite(
                *OPS.lora_linear_backward(g, x, w, a, b, 1.5, 0.0, None, strategy, [True, False, True, False, True])
            )
        # unaligned offset views (the 16-byte paths must fall back) and a broadcast grad_out
        _finite(OPS.lora_linear(x[:, 1:], w[:, 1:], None, a[:, 1:], b, 1.5, 0.0, None, 2))
        _finite(*OPS.lora_linear_backward(g[:1].expand(m, n), x, w, a, b, 1.5, 0.0, None, 1, [True] * 5))
        _finite(OPS.merged_weight(w, a, b, 0.5))
        for weight in (w.clone(), w.t().contiguous().t(), w.clone()[:, 1:]):
            aa = a if weight.shape[1] == k else a[:, 1:]
            OPS.merge_(weight, aa, b, 0.5)
            _finite(weight)
        OPS.dropout_mask(seed, m, k, 0.3)


def nf4_ops(dtype: torch.dtype) -> None:
    """nf4_dequantize, lora_linear_nf4, lora_linear_nf4_backward."""
    seed = torch.tensor(5, device=DEV)
    for (n, k), blocksize in (((67, 129), 64), ((7, 33), 32), ((40, 264), 64)):
        for double_quant in (False, True):
            qw = lora_ext.quantize_nf4(torch.randn(n, k) / k**0.5, blocksize, double_quant).to(DEV)
            _finite(OPS.nf4_dequantize(*qw.op_args(), [n, k], dtype))
            for m, r in ((37, 5), (3, 40)):
                x = torch.randn(m, k, device=DEV, dtype=dtype)
                a = torch.randn(r, k, device=DEV, dtype=dtype) / k**0.5
                b = torch.randn(n, r, device=DEV, dtype=dtype) / r**0.5
                bias = torch.randn(n, device=DEV, dtype=dtype)
                g = torch.randn(m, n, device=DEV, dtype=dtype)
                for p, s in ((0.0, None), (0.3, seed)):
                    _finite(OPS.lora_linear_nf4(x, *qw.op_args(), n, bias, a, b, 1.5, p, s))
                    _finite(*OPS.lora_linear_nf4_backward(g, x, *qw.op_args(), n, a, b, 1.5, p, s, [True] * 4))


def mixed_ops(dtype: torch.dtype) -> None:
    """lora_linear_mixed, lora_linear_mixed_backward (random, all-base and empty-segment indices, offset views)."""
    seed = torch.tensor(9, device=DEV)
    for m, k, n, r in SHAPES:
        n_ad = 4
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        w = torch.randn(n, k, device=DEV, dtype=dtype) / k**0.5
        a = torch.randn(n_ad, r, k, device=DEV, dtype=dtype) / k**0.5
        b = torch.randn(n_ad, n, r, device=DEV, dtype=dtype) / r**0.5
        bias = torch.randn(n, device=DEV, dtype=dtype)
        g = torch.randn(m, n, device=DEV, dtype=dtype)
        scales = [0.5, 1.0, 1.5, 2.0]
        for index in (
            torch.randint(-1, n_ad, (m,), device=DEV),
            torch.full((m,), -1, device=DEV),
            (torch.arange(m, device=DEV) % 2) * 2,  # adapters 1 and 3 own no row
        ):
            for ps, s in (([0.0] * n_ad, None), ([0.3, 0.0, 0.5, 1.0], seed)):
                _finite(OPS.lora_linear_mixed(x, w, bias, a, b, scales, index, ps, s))
                _finite(*OPS.lora_linear_mixed_backward(g, x, w, a, b, scales, index, ps, s, [True] * 4))
        index = torch.randint(-1, n_ad, (m,), device=DEV)
        _finite(OPS.lora_linear_mixed(x[:, 1:], w[:, 1:], None, a[:, :, 1:], b, scales, index, [0.0] * n_ad, None))
        _finite(*OPS.lora_linear_mixed_backward(g[:1].expand(m, n), x, w, a, b, scales, index, [0.0] * n_ad, None,
                                                [True, False, True, True]))  # fmt: skip


def main(argv: list[str]) -> int:
    info = lora_ext.build_info()
    if not (torch.cuda.is_available() and info.get("cuda")):
        print(f"sanitize case: needs a GPU and the CUDA kernels (build_info: {info})", file=sys.stderr)
        return 2
    names = (argv[0] if argv else "bf16,fp32").split(",")
    for name in names:
        lora_ops(DTYPES[name])
        nf4_ops(DTYPES[name])
        mixed_ops(DTYPES[name])
        torch.cuda.synchronize()
        print(f"sanitize case: {name} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
