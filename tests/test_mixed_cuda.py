"""lora_ext.lora_linear_mixed on CUDA against the float64 oracle of tests/test_mixed_ops.py
(the tolerance rule over index patterns and dtypes, the dropout mask equal to the CPU's, M=0).
Skips without a GPU; benchmarks/gpu_check.sh runs it with the other CUDA tests."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_rule
from test_mixed_ops import _case, _grads, _oracle

import lora_ext

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("index_kind", ["random", "all_base", "empty_segments", "sorted_runs"])
@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES], ids=["fp64", *DTYPE_IDS])
def test_cuda_matches_the_oracle(dtype, index_kind):
    m, n_ad = 37, 4
    index = {
        "random": None,
        "all_base": torch.full((m,), -1),
        "empty_segments": torch.tensor([0, 2] * 18 + [-1]),
        "sorted_runs": torch.arange(m) * n_ad // m,
    }[index_kind]
    (x, w, a, b, bb), index, scales = _case(m, 129, 67, 5, n_ad, dtype, index=index)
    g = torch.randn(m, 67, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def fused(x, a, b, bb):
        return lora_ext.lora_linear_mixed(x, w.cuda(), a, b, scales, index.cuda(), bb)

    out, grads = _grads(fused, [t.cuda() for t in (x, a, b, bb)], g.cuda())
    ref, ref_grads = _grads(
        lambda *t: _oracle(t[0], w.double(), *t[1:], scales, index), [t.double() for t in (x, a, b, bb)], g
    )
    tout, tgrads = _grads(lambda *t: _oracle(t[0], w, *t[1:], scales, index), [x, a, b, bb], g)
    assert_rule("y", out.cpu(), ref, tout, dtype)
    for name, got, want, base in zip(("x", "A", "B", "bias"), grads, ref_grads, tgrads):
        assert_rule(f"grad_{name}", got.cpu(), want, base, dtype)


@cuda
def test_cuda_dropout_equals_cpu_and_empty_batch():
    ps = [0.0, 0.3, 0.7]
    (x, w, a, b, bb), index, scales = _case(31, 40, 11, 4, 3, torch.float64)
    seed = torch.tensor(987654321, dtype=torch.int64)
    y_cpu = torch.ops.lora_ext.lora_linear_mixed(x, w, bb, a, b, scales, index, ps, seed)
    y_gpu = torch.ops.lora_ext.lora_linear_mixed(
        *(t.cuda() for t in (x, w, bb, a, b)), scales, index.cuda(), ps, seed.cuda()
    )
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-12, atol=1e-12)
    (x, w, a, b, bb), index, scales = _case(0, 16, 8, 2, 3, torch.float32)
    x, a, b = (t.cuda().requires_grad_(True) for t in (x, a, b))
    y = lora_ext.lora_linear_mixed(x, w.cuda(), a, b, scales, index.cuda(), bb.cuda())
    y.sum().backward()
    assert y.shape == (0, 8) and torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0
