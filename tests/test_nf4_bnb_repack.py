"""Converting a bitsandbytes Linear4bit that ran CPU inference (AVX512-BF16 repacking).

On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` in eval
mode with an input that does not require grad rewrites the weight in place
(``bitsandbytes.functional._convert_weight_packed_for_cpu``); its
``state_dict()`` runs the inverse, which leaves plain-NF4 scales in bfloat16,
transposed, and re-quantizes double-quantized ones (see tests/bnb_oracle.py).
The repacking is a pure-PyTorch function, so these tests apply it directly and
run on every CPU; ``test_eval_forward_repacks_on_avx512bf16`` ties that to the
real trigger where the CPU has it.
"""

from __future__ import annotations

import pytest
import torch
from bnb_oracle import assert_not_repacked, bnb_reference_path, default_dequantize_4bit, nf4_math_dequantize

import lora_ext
from lora_ext import LinearNF4
from lora_ext.quant.bnb_format import nf4_weight_from_state_dict

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
if not hasattr(F, "_convert_weight_packed_for_cpu"):
    pytest.skip("this bitsandbytes has no CPU weight repacking", allow_module_level=True)


@pytest.fixture(autouse=True)
def _eager_default_dequantize():
    with torch._dynamo.config.patch(disable=True), default_dequantize_4bit():
        yield


def bnb_linear(out_features, in_features, double_quant, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features)
    m = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                          compress_statistics=double_quant, quant_type="nf4")  # fmt: skip
    m.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=m)
    m = m.to("cpu")
    assert m.weight.dtype == torch.uint8 and m.weight.quant_state.nested == double_quant
    return m, w


def repack_as_eval_forward(m):
    """What ``Linear4bit.forward`` does on an AVX512-BF16 CPU in eval mode without gradients."""
    m.weight.data, m.weight.quant_state = F._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)


def test_plain_nf4_after_cpu_repacking_is_refused():
    m, w = bnb_linear(64, 128, double_quant=False)
    repack_as_eval_forward(m)
    sd = m.state_dict()  # bitsandbytes' inverse: codes restored, absmax left bf16 [K/blocksize, N]
    assert sd["weight.absmax"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"weight\.absmax is bfloat16 \[2, 64\].*CPU inference layout"):
        nf4_weight_from_state_dict(sd, "weight")
    ours = LinearNF4.from_linear(torch.nn.Linear(128, 64, bias=False))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match="CPU inference layout"):  # load_state_dict gathers the ValueError
        ours.load_state_dict(sd)
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "layer modified by a refused load"


def test_plain_nf4_without_repacking_loads_exactly():
    m, w = bnb_linear(64, 128, double_quant=False)
    sd = m.state_dict()
    qw = nf4_weight_from_state_dict(sd, "weight")
    math = nf4_math_dequantize(m.weight.data, m.weight.quant_state, torch.float32)
    assert torch.equal(lora_ext.dequantize_nf4(qw, torch.float32), math)


def test_double_quant_after_cpu_repacking_loads_what_bitsandbytes_holds():
    m, w = bnb_linear(64, 128, double_quant=True)
    repack_as_eval_forward(m)
    sd = m.state_dict()  # bitsandbytes re-quantizes the (bf16-rounded) scales: a valid double-quant state
    qs = m.weight.quant_state
    assert qs.nested and not qs.packing_format_for_cpu
    qw = nf4_weight_from_state_dict(sd, "weight")
    ours = lora_ext.dequantize_nf4(qw, torch.float32)
    assert torch.equal(ours, nf4_math_dequantize(m.weight.data, qs, torch.float32))
    assert torch.equal(ours, F.dequantize_4bit(m.weight.data, qs, quant_type="nf4"))


def test_double_quant_repacking_that_failed_half_way_loads_exactly():
    # rows of 96 are not a blocksize multiple: the repacking raises after replacing the
    # nested scales by their fp32 values; state_dict() then holds plain NF4 with the same scales
    m, w = bnb_linear(64, 96, double_quant=True)
    original = nf4_math_dequantize(m.weight.data, m.weight.quant_state, torch.float32)
    with pytest.raises(RuntimeError):
        repack_as_eval_forward(m)
    sd = m.state_dict()
    assert "weight.nested_absmax" not in sd and sd["weight.absmax"].dtype == torch.float32
    qw = nf4_weight_from_state_dict(sd, "weight")
    assert not qw.double_quant
    assert torch.equal(lora_ext.dequantize_nf4(qw, torch.float32), original)


def test_eval_forward_repacks_on_avx512bf16():
    if not F.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    x = torch.randn(3, 128)
    m, w = bnb_linear(64, 128, double_quant=False)
    m.eval()
    with torch.no_grad():
        m(x)
    assert m.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="CPU inference layout"):
        nf4_weight_from_state_dict(m.state_dict(), "weight")
    # the oracle helper keeps it on the dequantize + matmul path
    m, w = bnb_linear(64, 128, double_quant=False)
    bnb_reference_path(torch.nn.Sequential(m)).eval()
    with torch.no_grad():
        y = m(x)
    assert_not_repacked(torch.nn.Sequential(m))
    w_deq = nf4_math_dequantize(m.weight.data, m.weight.quant_state, torch.float32)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w_deq))  # fp32 math, not the bf16 kernel
