"""Shared helpers: float64 references and the tolerance rule of docs/design.md §4.

The rule: an implementation's max error against the float64 reference is at
most twice the error of plain PyTorch in the same dtype (the unfused formula
PEFT uses), plus a tiny atol.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

import lora_ext

ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# Every random input is seeded: each test starts from torch.manual_seed(SEED) and
# make_inputs draws from Generator(seed + SEED). LORA_EXT_TEST_SEED changes the
# base seed, so the suite can be run under other seeds to flush out flaky tests.
SEED = int(os.environ.get("LORA_EXT_TEST_SEED", "0"))


def pytest_report_header(config):
    info = lora_ext.build_info()
    return (
        f"lora_ext: extension_loaded={info['extension_loaded']} cuda={info['cuda']} "
        f"library={info['library_path']} load_error={info['load_error']}; "
        f"cpu={torch.backends.cpu.get_cpu_capability()} LORA_EXT_TEST_SEED={SEED}"
    )


def torch_lora(x, weight, lora_A, lora_B, scale, bias=None, keep=None, p=0.0):
    """The plain unfused formula (PEFT style), in the inputs' dtype; keep is the dropout keep-mask."""
    xd = x
    if keep is not None:
        xd = x * keep.view_as(x).to(x.dtype) / (1.0 - p)
    y = torch.nn.functional.linear(x, weight, bias)
    return y + ((xd @ lora_A.t()) @ lora_B.t()) * scale


def make_inputs(m, k, n, r, dtype, device="cpu", bias=True, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed + SEED)
    shape = (*batch, m, k) if batch else (m, k)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5
    bb = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    out = [t.to(dtype=dtype, device=device) if t is not None else None for t in (x, w, a, b, bb)]
    return out


def dropout_case(m, k, n, r, dtype, p, scale):
    """(inputs, keep-mask, fused fn) of a dropout test: the mask the public wrapper will draw for seed 123."""
    inputs = make_inputs(m, k, n, r, dtype, batch=(2,))
    torch.manual_seed(123)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # the wrapper draws exactly this
    keep = lora_ext.dropout_mask(seed, 2 * m, k, p)

    def fused(x, w, a, b, bb):
        torch.manual_seed(123)
        return lora_ext.lora_linear(x, w, a, b, scale, bias=bb, dropout_p=p)

    return inputs, keep, fused


def check_empty_batch(dtype) -> None:
    """M = 0 through the public op: an empty output, zero gradients of the right shapes."""
    x, w, a, b, bias = make_inputs(0, 16, 8, 2, dtype)
    leaves = [t.requires_grad_(True) for t in (x, w, a, b, bias)]
    y = lora_ext.lora_linear(*leaves[:4], 1.0, bias=leaves[4], dropout_p=0.2)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 16)
    for t in leaves[1:]:
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


def run_in_fallback_mode(files: list[str], timeout: int) -> str:
    """Run pytest on ``files`` in a subprocess with LORA_EXT_DISABLE_EXTENSION=1; returns its last lines."""
    env = dict(os.environ, LORA_EXT_DISABLE_EXTENSION="1")
    env.pop("LORA_EXT_REQUIRE_EXTENSION", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = "\n".join(out.stdout.splitlines()[-30:])
    assert out.returncode == 0, f"fallback-mode run failed:\n{tail}\n{out.stderr[-3000:]}"
    return tail


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.double().cpu() - ref.double().cpu()).abs().max().item()


def assert_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, dtype) -> None:
    """Error of `out` vs the float64 reference ≤ 2 × error of plain PyTorch + atol."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != {torch_out.dtype}"
    assert torch.isfinite(out).all() or not torch.isfinite(ref64).all(), f"{name}: non-finite values in output"
    if out.numel() == 0:
        return
    err = max_err(out, ref64)
    base = max_err(torch_out, ref64)
    bound = 2 * base + ATOL[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > 2 x PyTorch's {base:.3e} + atol (bound {bound:.3e})"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(SEED)
    random.seed(SEED)
    yield


requires_extension = pytest.mark.skipif(
    not lora_ext.extension_loaded(), reason="compiled extension not loaded (fallback mode)"
)

IN_FALLBACK_MODE = os.environ.get("LORA_EXT_DISABLE_EXTENSION", "") not in ("", "0")
