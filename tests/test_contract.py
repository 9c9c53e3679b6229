"""One validation contract: the same bad input raises the same exception class on every path.

Paths: the public wrapper (lora_ext.lora_linear / lora_linear_nf4), the op called directly
(torch.ops.lora_ext.*: the compiled C++ kernel when the extension is loaded), and the
pure-PyTorch fallback kernels (lora_ext/ops/reference.py), and the whole file once more
in a subprocess with LORA_EXT_DISABLE_EXTENSION=1.
ValueError: shapes and values; TypeError: dtypes and devices (csrc/host/checks.h,
lora_ext/ops/checks.py). Wrong device needs a second real device (meta tensors dispatch to the
fake kernels), so it is covered by tests/test_cuda.py on a GPU machine only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IN_FALLBACK_MODE, run_in_fallback_mode

import lora_ext
from lora_ext.ops import _library as _ops
from lora_ext.ops import reference as _reference

OPS = torch.ops.lora_ext


def _good(m=4, k=6, n=5, r=2):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*s, generator=g) for s in ((m, k), (n, k), (r, k), (n, r)))


def _case(name):
    """(public call or None, op-level args of lora_linear, expected class, message pattern)."""
    x, w, a, b = _good()
    op = dict(x=x, weight=w, bias=None, lora_A=a, lora_B=b, scale=1.0, dropout_p=0.0, dropout_seed=None, strategy=0)
    pub = dict(x=x, weight=w, lora_A=a, lora_B=b, scale=1.0)
    if name == "wrong_K":
        op["x"] = pub["x"] = torch.randn(4, 7)
        return pub, op, ValueError, r"x has K = 7"
    if name == "dtype_mix":
        op["x"] = pub["x"] = x.double()
        return pub, op, TypeError, r"x has dtype torch.float64 but weight has dtype torch.float32"
    if name == "adapter_dtype":
        op["lora_B"] = pub["lora_B"] = b.half()
        return pub, op, TypeError, r"lora_B has dtype torch.float16"
    if name == "int_dtype":
        op["x"] = pub["x"] = x.long()
        return pub, op, TypeError, r"x must be float32, float16, bfloat16 or float64"
    if name == "dropout_p":
        op["dropout_p"] = pub["dropout_p"] = 1.5
        return pub, op, ValueError, r"dropout_p must be in \[0, 1\]"
    if name == "missing_seed":  # the public wrapper always draws a seed
        op["dropout_p"] = 0.5
        return None, op, ValueError, r"dropout_p > 0 needs a dropout_seed"
    if name == "seed_dtype":
        op["dropout_p"], op["dropout_seed"] = 0.5, torch.tensor(1.0)
        return None, op, ValueError, r"dropout_seed must be a one-element int64 tensor"
    if name == "strategy":
        op["strategy"], pub["strategy"] = 7, "fastest"
        return pub, op, ValueError, r"strategy must be"
    if name == "bias_shape":
        op["bias"] = pub["bias"] = torch.randn(4)
        return pub, op, ValueError, r"bias must be \[N\] = \[5\], got shape \[4\]"
    if name == "rank_zero":
        op["lora_A"] = pub["lora_A"] = torch.randn(0, 6)
        op["lora_B"] = pub["lora_B"] = torch.randn(5, 0)
        return pub, op, ValueError, r"rank must be positive"
    if name == "scale_inf":
        op["scale"] = pub["scale"] = float("inf")
        return pub, op, ValueError, r"scale must be finite"
    raise KeyError(name)


CASES = [
    "wrong_K", "dtype_mix", "adapter_dtype", "int_dtype", "dropout_p", "missing_seed", "seed_dtype", "strategy",
    "bias_shape", "rank_zero", "scale_inf",
]  # fmt: skip
ORDER = ("x", "weight", "bias", "lora_A", "lora_B", "scale", "dropout_p", "dropout_seed", "strategy")


def test_direct_calls_reach_the_compiled_kernel():
    if lora_ext.extension_loaded():
        assert "CPU" not in _ops.fallback_dispatch_keys("lora_linear")
        assert "CPU" not in _ops.fallback_dispatch_keys("lora_linear_nf4")
    else:
        assert "CPU" in _ops.fallback_dispatch_keys("lora_linear")


@pytest.mark.parametrize("case", CASES)
def test_lora_linear_same_class_on_every_path(case):
    pub, op, exc, pattern = _case(case)
    args = [op[k] for k in ORDER]
    if pub is not None:
        with pytest.raises(exc, match=pattern):
            lora_ext.lora_linear(**pub)
    with pytest.raises(exc, match=pattern):
        OPS.lora_linear(*args)
    with pytest.raises(exc, match=pattern):
        _reference.lora_linear(*args)
    # The backward op validates the same arguments (no bias there).
    if op["bias"] is None:
        g = torch.randn(op["x"].shape[0], op["weight"].shape[0]) if op["x"].dim() == 2 else None
        bargs = [g, *[op[k] for k in ORDER if k != "bias"], [True] * 5]
        with pytest.raises(exc, match=pattern):
            OPS.lora_linear_backward(*bargs)
        with pytest.raises(exc, match=pattern):
            _reference.lora_linear_backward(*bargs)
        # and so does the pair that keeps xa (the x checks come before the xa ones)
        with pytest.raises(exc, match=pattern):
            OPS.lora_linear_xa(*args)
        with pytest.raises(exc, match=pattern):
            _reference.lora_linear_xa(*args)
        if g is not None:
            xa = torch.zeros(op["x"].shape[0], op["lora_A"].shape[0], dtype=torch.float32)
            xargs = [*bargs[:2], xa, *bargs[2:]]
            with pytest.raises(exc, match=pattern):
                OPS.lora_linear_backward_xa(*xargs)
            with pytest.raises(exc, match=pattern):
                _reference.lora_linear_backward_xa(*xargs)


@pytest.mark.parametrize(
    "xa, exc, pattern",
    [
        (torch.zeros(4, 3), ValueError, r"xa must be \[M, r\] = \[4, 2\].*got shape \[4, 3\]"),
        (torch.zeros(3, 2), ValueError, r"xa must be \[M, r\] = \[4, 2\].*got shape \[3, 2\]"),
        (torch.zeros(8), ValueError, r"xa must be \[M, r\] = \[4, 2\].*got shape \[8\]"),
        (torch.zeros(4, 2, dtype=torch.float64), TypeError, r"xa must be torch.float32 for torch.float32 x"),
        (torch.zeros(4, 2, dtype=torch.bfloat16), TypeError, r"xa must be torch.float32 .*got torch.bfloat16"),
    ],
    ids=["wrong_r", "wrong_M", "1d", "float64", "bfloat16"],
)
def test_saved_xa_same_class(xa, exc, pattern):
    x, w, a, b = _good()
    args = (torch.randn(4, 5), x, xa, w, a, b, 1.0, 0.0, None, 0, [True] * 5)
    for fn in (OPS.lora_linear_backward_xa, _reference.lora_linear_backward_xa):
        with pytest.raises(exc, match=pattern):
            fn(*args)


def test_grad_out_shape_same_class():
    x, w, a, b = _good()
    args = (torch.randn(4, 4), x, w, a, b, 1.0, 0.0, None, 0, [True] * 5)
    for fn in (OPS.lora_linear_backward, _reference.lora_linear_backward):
        with pytest.raises(ValueError, match=r"grad_out must be \[M, N\] = \[4, 5\]"):
            fn(*args)


def test_merge_same_class():
    _, w, a, b = _good()
    for fn in (lora_ext.merged_weight, OPS.merged_weight, _reference.merged_weight):
        with pytest.raises(ValueError, match=r"lora_B must be \[N, r\]"):
            fn(w, a, torch.randn(6, 2), 1.0)
        with pytest.raises(TypeError, match=r"lora_A has dtype"):
            fn(w, a.double(), b, 1.0)


def test_dropout_mask_same_class():
    for fn in (OPS.dropout_mask, _reference.dropout_mask):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
            fn(torch.tensor(1), 2, 2, 2.0)
        with pytest.raises(ValueError, match=r"rows and cols must be >= 0"):
            fn(torch.tensor(1), -1, 2, 0.5)


# ------------------------------------------------------------------------- NF4


def _nf4():
    g = torch.Generator().manual_seed(1)
    qw = lora_ext.quantize_nf4(torch.randn(16, 64, generator=g), blocksize=64)
    x = torch.randn(4, 64, generator=g)
    a, b = torch.randn(2, 64, generator=g), torch.randn(16, 2, generator=g)
    return qw, x, a, b


@pytest.mark.parametrize("blocksize", [48, 16, 8192])
def test_nf4_bad_blocksize_same_class(blocksize):
    qw, x, a, b = _nf4()
    with pytest.raises(ValueError, match="blocksize must be one of"):
        lora_ext.quantize_nf4(torch.randn(16, 64), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        lora_ext.NF4Weight(qw.packed, qw.absmax, blocksize, qw.shape, qw.dtype, qw.nested_absmax, qw.nested_code,
                           qw.offset)  # fmt: skip
    st = list(qw.op_args())
    st[5] = blocksize
    for fn in (OPS.lora_linear_nf4, _reference.lora_linear_nf4):
        with pytest.raises(ValueError, match="blocksize must be one of"):
            fn(x, *st, 16, None, a, b, 1.0, 0.0, None)
    for fn in (OPS.nf4_dequantize, _reference.nf4_dequantize):
        with pytest.raises(ValueError, match="blocksize must be one of"):
            fn(*st, [16, 64], torch.float32)


@pytest.mark.parametrize("case", ["wrong_K", "dtype_mix", "bias_shape", "dropout_p", "missing_seed", "scale_inf"])
def test_nf4_lora_same_class(case):
    qw, x, a, b = _nf4()
    kw = dict(bias=None, dropout_p=0.0, scale=1.0)
    seed = None
    if case == "wrong_K":
        # The op knows K only from x, so its storage check (packed size) fires first.
        x, exc, pattern = torch.randn(4, 63), ValueError, "x has K|bytes"
    elif case == "dtype_mix":
        a, exc, pattern = a.double(), TypeError, "lora_A has dtype"
    elif case == "bias_shape":
        kw["bias"], exc, pattern = torch.randn(15), ValueError, r"bias must be \[N\] = \[16\]"
    elif case == "dropout_p":
        kw["dropout_p"], exc, pattern = -0.5, ValueError, r"dropout_p must be in \[0, 1\]"
    elif case == "missing_seed":
        kw["dropout_p"], exc, pattern = 0.5, ValueError, "needs a dropout_seed"
    else:
        kw["scale"], exc, pattern = float("nan"), ValueError, "scale must be finite"
    if case != "missing_seed":
        with pytest.raises(exc, match=pattern):
            lora_ext.lora_linear_nf4(x, qw, a, b, kw["scale"], kw["bias"], kw["dropout_p"])
    args = (x, *qw.op_args(), 16, kw["bias"], a, b, kw["scale"], kw["dropout_p"], seed)
    for fn in (OPS.lora_linear_nf4, _reference.lora_linear_nf4):
        with pytest.raises(exc, match=pattern):
            fn(*args)


def test_strategy_plan_matches_the_kernels_cost_model():
    """strategy_plan reports the kernels' own resolve_strategy (no re-derivation in Python)."""
    if not lora_ext.extension_loaded():
        assert lora_ext.strategy_plan(8, 8, 8, torch.float32)["forward"] == "reference"
        return
    # CPU keeps W_eff in fp32 (4 bytes), CUDA in the weight dtype: bf16 flips the choice here.
    assert lora_ext.strategy_plan(8192, 4096, 4096, torch.bfloat16, device="cuda")["forward"] == "merge"
    assert lora_ext.strategy_plan(8192, 4096, 4096, torch.bfloat16, device="cpu")["forward"] == "shrink_expand"
    assert lora_ext.strategy_plan(8192, 4096, 4096, torch.bfloat16, device="cuda:0")["forward"] == "merge"
    with pytest.raises(ValueError, match="strategy must be"):
        lora_ext.strategy_plan(8, 8, 8, torch.float32, strategy="fastest")


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
def test_contract_holds_in_fallback_mode():
    run_in_fallback_mode(["tests/test_contract.py"], timeout=900)
