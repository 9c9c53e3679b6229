"""The DoRA op family (lora_ext/ops/dora.py, csrc/host/dora_impl.h): numerics against float64
with the tolerance rule, the cancellation rule of the norm, gradients, gradcheck, opcheck,
bad input, and the same results in fallback mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, IN_FALLBACK_MODE, SEED, make_inputs, max_err, run_in_fallback_mode

import lora_ext
from lora_ext.ops import dora as dora_ops

OPS = torch.ops.lora_ext
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
IDS = ["fp32", "bf16", "fp16", "fp64"]
SHAPES = [(37, 129, 67, 5), (1, 16, 8, 1), (64, 96, 300, 16)]  # (M, K, N, r): miss every tile; r = 1; N > a block


def _magnitude(w64: torch.Tensor, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + SEED)
    return w64.norm(dim=1) * (1 + 0.3 * torch.randn(w64.shape[0], generator=g, dtype=torch.float64))


def _norm64(w, a, b, s):
    return torch.linalg.norm(w.double() + s * (b.double() @ a.double()), dim=1)


def peft_dora(x, w, a, b, m, s, bias=None, keep=None, p=0.0):
    """PEFT's DoRA forward (peft/tuners/lora/dora.py + variants.py), unfused, in the inputs' dtype."""
    result = F.linear(x, w, bias)
    norm = torch.linalg.norm(w + s * (b @ a), dim=1).to(w.dtype).detach()
    g = (m / norm).view(1, -1)
    if keep is None:
        xd = x
        base_result = result - bias if bias is not None else result
    else:
        xd = x * keep.to(x.dtype) / (1.0 - p)
        base_result = F.linear(xd, w)
    return result + (g - 1) * base_result + g * ((xd @ a.t()) @ b.t()) * s


def _rule(name, out, ref64, torch_out, dtype):
    err, base = max_err(out, ref64), max_err(torch_out, ref64)
    bound = 2 * base + ATOL[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > 2 x PyTorch's {base:.3e} + atol (bound {bound:.3e})"


# ----------------------------------------------------------------------------- norm


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_norm_rule(dtype, shape):
    _, k, n, r = shape
    _, w, a, b, _ = make_inputs(1, k, n, r, dtype)
    s = 1.7
    ref = _norm64(w, a, b, s)
    out = lora_ext.dora_weight_norm(w, a, b, s)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == (n,)
    plain = torch.linalg.norm(w + s * (b @ a), dim=1)  # PEFT's norm, in the dtype
    _rule("norm", out, ref, plain, dtype)
    # the cached ||w_n||^2 gives the same norm
    sq = lora_ext.ops.weight_sq_norm(w)
    torch.testing.assert_close(lora_ext.dora_weight_norm(w, a, b, s, sq), out, rtol=0, atol=0)


def _cancelling(dtype, n=64, k=96, r=4, s=2.0, rel=1e-4):
    """W whose even rows are -s b_n A plus a perturbation of relative size `rel`: ||w + s b A|| << its terms."""
    _, w, a, b, _ = make_inputs(1, k, n, r, torch.float64)
    g = torch.Generator().manual_seed(11 + SEED)
    delta = -s * (b @ a)
    w = w.clone()
    w[::2] = delta[::2] + rel * delta[::2].norm(dim=1, keepdim=True) * torch.randn(n // 2, k, generator=g) / k**0.5
    return w.to(dtype), a.to(dtype), b.to(dtype), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cancellation_rows_take_the_direct_formula(dtype):
    w, a, b, s = _cancelling(dtype)
    ref = _norm64(w, a, b, s)  # exact for the rounded inputs
    out = lora_ext.dora_weight_norm(w, a, b, s)
    direct = torch.linalg.norm(w + s * (b @ a), dim=1)  # the direct formula in the dtype
    _rule("norm under cancellation", out, ref, direct, dtype)
    rel = ((out.double() - ref) / ref).abs()
    # Per row as well (the rule above is on the largest error): the direct formula's rounding error is
    # eps times the row's condition (‖w_n‖ + ‖s·b_n A‖) / ‖w_n + s·b_n A‖ (1e4 here), so the bound scales
    # with it; the expansion's error scales with its square and fails this by orders of magnitude.
    w64, s_ba = w.double(), s * (b.double() @ a.double())
    cond = (w64.norm(dim=1) + s_ba.norm(dim=1)) / ref
    eps = torch.finfo(dtype).eps
    assert (rel <= 16 * eps * cond + eps).all(), (rel.max(), (16 * eps * cond).min())
    # The expansion alone is useless on those rows: the rule is what makes the result right.
    acc = a.dtype
    sq = (w * w).sum(1)
    expansion = (sq + 2 * s * (b * (w @ a.t())).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)).clamp_min(0).sqrt()
    rel_exp = ((expansion.to(acc).double() - ref) / ref).abs()
    assert rel_exp[::2].max() > 1e3 * rel.max(), (rel_exp[::2].max(), rel.max())


def test_cancellation_rule_selects_only_the_cancelling_rows(monkeypatch):
    """The fallback's rule picks exactly the even rows (the others keep the expansion)."""
    w, a, b, s = _cancelling(torch.float32)
    picked = []
    real = torch.Tensor.index_select

    def spy(self, dim, index):
        if self.shape == w.shape and dim == 0:
            picked.append(index.clone())
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    dora_ops._weight_norm_ref(w, a, b, s, None)
    assert len(picked) == 1 and torch.equal(picked[0], torch.arange(0, w.shape[0], 2))


# -------------------------------------------------------------------------- forward


def _case(shape, dtype, bias=True):
    m, k, n, r = shape
    x, w, a, b, bb = make_inputs(m, k, n, r, dtype, bias=bias)
    mag = _magnitude(w.double()).to(dtype)
    return x, w, a, b, mag, bb


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_rule(dtype, shape, bias):
    x, w, a, b, mag, bb = _case(shape, dtype, bias)
    s = 0.8
    out = lora_ext.dora_linear(x, w, a, b, mag, s, bias=bb)
    d = [t.double() if t is not None else None for t in (x, w, a, b, mag, bb)]
    ref = peft_dora(*d[:5], s, d[5])
    _rule("dora_linear", out, ref, peft_dora(x, w, a, b, mag, s, bb), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_forward_and_grads_with_dropout_rule(dtype):
    x, w, a, b, mag, bb = _case((2 * 37, 129, 67, 5), dtype)
    s, p = 0.8, 0.3
    torch.manual_seed(123)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # the wrapper draws exactly this
    keep = lora_ext.dropout_mask(seed, x.shape[0], x.shape[1], p)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    torch.manual_seed(123)
    out = lora_ext.dora_linear(*leaves[:5], s, bias=leaves[5], dropout_p=p)
    d = [t.detach().double().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    ref = peft_dora(*d[:5], s, d[5], keep=keep, p=p)
    t_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    plain = peft_dora(*t_leaves[:5], s, t_leaves[5], keep=keep, p=p)
    _rule("forward", out, ref, plain, dtype)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype)
    out.backward(g)
    ref.backward(g.double())
    plain.backward(g)
    for name, ours, r64, pt in zip(["x", "weight", "lora_A", "lora_B", "magnitude", "bias"], leaves, d, t_leaves):
        _rule(f"grad {name}", ours.grad, r64.grad, pt.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_grads_rule(dtype, shape):
    x, w, a, b, mag, bb = _case(shape, dtype)
    s = 1.3
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    out = lora_ext.dora_linear(*leaves[:5], s, bias=leaves[5])
    d = [t.detach().double().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    ref = peft_dora(*d[:5], s, d[5])
    t_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    plain = peft_dora(*t_leaves[:5], s, t_leaves[5])
    # an expanded (stride-0) upstream gradient
    g = torch.randn(1, out.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    g = g.expand_as(out)
    out.backward(g)
    ref.backward(g.double())
    plain.backward(g)
    for name, ours, r64, pt in zip(["x", "weight", "lora_A", "lora_B", "magnitude", "bias"], leaves, d, t_leaves):
        _rule(f"grad {name}", ours.grad, r64.grad, pt.grad, dtype)


def test_non_contiguous_and_batched_inputs():
    x, w, a, b, mag, bb = _case((24, 40, 30, 3), torch.float32)
    xt = x.t().contiguous().t()  # a transposed view
    wt = w.t().contiguous().t()
    out = lora_ext.dora_linear(xt.view(4, 6, 40), wt, a, b, mag, 0.5, bias=bb)
    ref = peft_dora(*(t.double() for t in (x, w, a, b, mag)), 0.5, bb.double())
    assert out.shape == (4, 6, 30)
    torch.testing.assert_close(out.reshape(24, 30).double(), ref, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x, w, a, b, mag, bb = _case((0, 16, 8, 2), torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    y = lora_ext.dora_linear(*leaves[:5], 1.0, bias=leaves[5], dropout_p=0.2)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 16)
    for t in leaves[1:]:
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


def test_norm_is_detached():
    """No gradient flows through ||W + sBA|| (PEFT, DoRA paper §4.3): grads equal those with a constant norm."""
    x, w, a, b, mag, _ = _case((9, 12, 7, 2), torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (a, b)]
    lora_ext.dora_linear(x, w, leaves[0], leaves[1], mag, 0.9).sum().backward()
    norm = _norm64(w, a, b, 0.9)
    a2, b2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ((mag / norm) * (x @ w.t() + 0.9 * (x @ a2.t()) @ b2.t())).sum().backward()
    torch.testing.assert_close(leaves[0].grad, a2.grad)
    torch.testing.assert_close(leaves[1].grad, b2.grad)


# ------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(p):
    x, w, a, b, mag, bb = _case((7, 6, 5, 2), torch.float64)
    norm = lora_ext.dora_weight_norm(w, a, b, 0.7)
    seed = torch.tensor(99, dtype=torch.int64) if p else None
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]

    def f(x, w, a, b, m, bias):
        return OPS.dora_linear(x, w, bias, a, b, m, norm, 0.7, p, seed)

    assert torch.autograd.gradcheck(f, leaves)


def _seed():
    return torch.tensor(1234567, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_dora_linear(dtype, p, bias):
    x, w, a, b, mag, bb = _case((13, 10, 7, 3), dtype, bias)
    norm = lora_ext.dora_weight_norm(w, a, b, 0.5)
    args = [t.requires_grad_(True) if t is not None else None for t in (x, w, bb, a, b, mag)]
    torch.library.opcheck(OPS.dora_linear.default, (*args, norm, 0.5, p, _seed() if p else None))


@pytest.mark.parametrize(
    "mask", [[True] * 6, [True, False, False, True, True, True], [False, True, True, False, False, True]]
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_dora_backward_and_norm(mask, p):
    x, w, a, b, mag, _ = _case((11, 9, 6, 2), torch.float32)
    norm = lora_ext.dora_weight_norm(w, a, b, 0.7)
    g = torch.randn(11, 6)
    torch.library.opcheck(
        OPS.dora_linear_backward.default, (g, x, w, a, b, mag, norm, 0.7, p, _seed() if p else None, mask)
    )
    torch.library.opcheck(OPS.dora_weight_norm.default, (w, a, b, 0.7, None))
    torch.library.opcheck(OPS.dora_weight_norm.default, (w, a, b, 0.7, lora_ext.ops.weight_sq_norm(w)))


def test_torch_compile_fullgraph_matches_eager():
    x, w, a, b, mag, bb = _case((8, 12, 10, 2), torch.float32)
    f = torch.compile(lambda x: lora_ext.dora_linear(x, w, a, b, mag, 0.5, bias=bb), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), lora_ext.dora_linear(x, w, a, b, mag, 0.5, bias=bb))


# ------------------------------------------------------------------------ bad input


def test_bad_input_same_class_on_every_path():
    x, w, a, b, mag, bb = _case((5, 8, 6, 2), torch.float32)
    norm = lora_ext.dora_weight_norm(w, a, b, 0.5)
    with pytest.raises(ValueError, match=r"magnitude must be \[N\] = \[6\]"):
        lora_ext.dora_linear(x, w, a, b, mag[:5], 0.5)
    with pytest.raises(ValueError, match=r"magnitude must be \[N\] = \[6\]"):
        OPS.dora_linear(x, w, None, a, b, mag[:5], norm, 0.5, 0.0, None)
    with pytest.raises(TypeError, match="magnitude must have dtype torch.float32"):
        lora_ext.dora_linear(x, w, a, b, mag.double(), 0.5)
    with pytest.raises(TypeError, match="magnitude must have dtype torch.float32"):
        OPS.dora_linear(x, w, None, a, b, mag.double(), norm, 0.5, 0.0, None)
    with pytest.raises(TypeError, match="weight_norm must have dtype torch.float32"):
        OPS.dora_linear(x, w, None, a, b, mag, norm.double(), 0.5, 0.0, None)
    with pytest.raises(ValueError, match=r"weight_norm must be \[N\]"):
        OPS.dora_linear(x, w, None, a, b, mag, norm[:3], 0.5, 0.0, None)
    with pytest.raises(ValueError, match=r"weight_sq_norm must be \[N\]"):
        lora_ext.dora_weight_norm(w, a, b, 0.5, norm[:2])
    with pytest.raises(TypeError, match="weight_sq_norm must have dtype"):
        OPS.dora_weight_norm(w, a, b, 0.5, norm.half())
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_ext.dora_linear(x, w, a, b[:, :1], mag, 0.5)
    with pytest.raises(ValueError, match="grad_out must be"):
        OPS.dora_linear_backward(torch.ones(5, 5), x, w, a, b, mag, norm, 0.5, 0.0, None, [True] * 6)
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor"):
        lora_ext.dora_linear(x, w, a, b, [1.0] * 6, 0.5)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lora_ext.dora_linear(x, w, a, b, mag, 0.5, dropout_p=1.5)


# ------------------------------------------------------------------ fallback mode


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already in fallback mode")
def test_compiled_and_fallback_agree_and_fallback_suite_passes():
    x, w, a, b, mag, bb = _case((37, 129, 67, 5), torch.bfloat16)
    out = lora_ext.dora_linear(x, w, a, b, mag, 0.8, bias=bb)
    ref = dora_ops._dora_linear_ref(x, w, bb, a, b, mag, dora_ops._weight_norm_ref(w, a, b, 0.8, None), 0.8, 0.0, None)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    if lora_ext.extension_loaded():
        tail = run_in_fallback_mode(["tests/test_dora_ops.py"], timeout=900)
        assert "passed" in tail
