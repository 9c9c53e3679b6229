"""Bad input gets a clear error that names the tensor and shows the shapes; nothing is modified."""

from __future__ import annotations

import math

import pytest
import torch

import lora_ext


def _good(m=4, k=6, n=5, r=2, dtype=torch.float32):
    return (
        torch.randn(m, k, dtype=dtype),
        torch.randn(n, k, dtype=dtype),
        torch.randn(r, k, dtype=dtype),
        torch.randn(n, r, dtype=dtype),
    )


CASES = {
    "x_wrong_K": (
        lambda x, w, a, b: (torch.randn(4, 7), w, a, b, 1.0, {}),
        ValueError,
        r"x has K = 7 .*\[4, 7\].*weight is \[N, K\] = \[5, 6\]",
    ),
    "A_wrong_K": (
        lambda x, w, a, b: (x, w, torch.randn(2, 9), b, 1.0, {}),
        ValueError,
        r"lora_A must be \[r, K\] with K = 6.*got lora_A of shape \[2, 9\]",
    ),
    "B_wrong_N": (
        lambda x, w, a, b: (x, w, a, torch.randn(4, 2), 1.0, {}),
        ValueError,
        r"lora_B must be \[N, r\] = \[5, 2\].*got lora_B of shape \[4, 2\]",
    ),
    "B_wrong_r": (
        lambda x, w, a, b: (x, w, a, torch.randn(5, 3), 1.0, {}),
        ValueError,
        r"lora_B must be \[N, r\] = \[5, 2\].*\[5, 3\]",
    ),
    "rank_zero": (
        lambda x, w, a, b: (x, w, torch.randn(0, 6), torch.randn(5, 0), 1.0, {}),
        ValueError,
        r"rank must be positive.*\[0, 6\]",
    ),
    "weight_1d": (
        lambda x, w, a, b: (x, torch.randn(6), a, b, 1.0, {}),
        ValueError,
        r"weight must be 2-D \[N, K\], got shape \[6\]",
    ),
    "bias_shape": (
        lambda x, w, a, b: (x, w, a, b, 1.0, {"bias": torch.randn(4)}),
        ValueError,
        r"bias must be \[N\] = \[5\], got shape \[4\]",
    ),
    "dtype_mismatch": (
        lambda x, w, a, b: (x.double(), w, a, b, 1.0, {}),
        TypeError,
        r"x has dtype torch.float64 but weight has dtype torch.float32",
    ),
    "A_dtype": (lambda x, w, a, b: (x, w, a.half(), b, 1.0, {}), TypeError, r"lora_A has dtype torch.float16"),
    "int_dtype": (
        lambda x, w, a, b: (x.long(), w, a, b, 1.0, {}),
        TypeError,
        r"x must be float32, float16, bfloat16 or float64",
    ),
    "device_mismatch": (
        lambda x, w, a, b: (x, w, a, b.to("meta"), 1.0, {}),
        TypeError,
        r"lora_B is on meta but weight is on cpu",
    ),
    "scale_inf": (lambda x, w, a, b: (x, w, a, b, math.inf, {}), ValueError, r"scale must be finite, got inf"),
    "scale_nan": (lambda x, w, a, b: (x, w, a, b, math.nan, {}), ValueError, r"scale must be finite, got nan"),
    "scale_tensor": (
        lambda x, w, a, b: (x, w, a, b, torch.tensor(1.0), {}),
        TypeError,
        r"scale must be a Python number",
    ),
    "dropout_range": (
        lambda x, w, a, b: (x, w, a, b, 1.0, {"dropout_p": 1.5}),
        ValueError,
        r"dropout_p must be in \[0, 1\], got 1.5",
    ),
    "strategy": (lambda x, w, a, b: (x, w, a, b, 1.0, {"strategy": "fastest"}), ValueError, r"strategy must be one of"),
    "not_tensor": (lambda x, w, a, b: (x.tolist(), w, a, b, 1.0, {}), TypeError, r"x must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_linear_bad_input(case):
    build, exc, pattern = CASES[case]
    x, w, a, b, scale, kw = build(*_good())
    with pytest.raises(exc, match=pattern):
        lora_ext.lora_linear(x, w, a, b, scale, **kw)


@pytest.mark.parametrize("fn", [lora_ext.merge_, lora_ext.unmerge_, lora_ext.merged_weight])
def test_merge_bad_input_leaves_weight_unchanged(fn):
    _, w, a, b = _good()
    before = w.clone()
    with pytest.raises(ValueError, match=r"lora_B must be \[N, r\] = \[5, 2\]"):
        fn(w, a, torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        fn(w, a, b, float("nan"))
    with pytest.raises(TypeError, match="lora_A has dtype"):
        fn(w, a.double(), b, 1.0)
    assert torch.equal(w, before)


def test_direct_op_calls_are_checked_too():
    """torch.ops.lora_ext.* called directly: C++ checks when compiled, Python checks in the fallback,
    the same exception class either way."""
    x, w, a, b = _good()
    with pytest.raises(ValueError, match=r"lora_ext: x has K = 7"):
        torch.ops.lora_ext.lora_linear(torch.randn(4, 7), w, None, a, b, 1.0, 0.0, None, 0)
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, K\]"):
        torch.ops.lora_ext.lora_linear(torch.randn(2, 4, 6), w, None, a, b, 1.0, 0.0, None, 0)
    with pytest.raises(ValueError, match=r"needs a dropout_seed"):
        torch.ops.lora_ext.lora_linear(x, w, None, a, b, 1.0, 0.5, None, 0)
    with pytest.raises(ValueError, match=r"grad_out must be \[M, N\] = \[4, 5\]"):
        torch.ops.lora_ext.lora_linear_backward(torch.randn(4, 4), x, w, a, b, 1.0, 0.0, None, 0, [True] * 5)
    with pytest.raises(ValueError, match=r"strategy must be 0"):
        torch.ops.lora_ext.lora_linear(x, w, None, a, b, 1.0, 0.0, None, 7)
    before = w.clone()
    with pytest.raises(ValueError, match=r"lora_A must be \[r, K\]"):
        torch.ops.lora_ext.merge_(w, torch.randn(2, 3), b, 1.0)
    assert torch.equal(w, before)


def test_dropout_mask_bad_input():
    with pytest.raises(TypeError, match="seed must be a one-element int64 tensor"):
        lora_ext.dropout_mask(torch.tensor([1.0]), 2, 2, 0.5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        lora_ext.dropout_mask(torch.tensor(1), 2, 2, 2.0)
