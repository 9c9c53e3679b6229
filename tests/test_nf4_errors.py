"""Bad input to the NF4 API: a clear error naming what is wrong, and nothing modified."""

from __future__ import annotations

import json

import pytest
import torch

import lora_ext
from lora_ext import LinearNF4


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, True, 64.0, "64"])
def test_quantize_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        lora_ext.quantize_nf4(torch.randn(4, 64), blocksize=blocksize)


@pytest.mark.parametrize("shape", [(64,), (2, 4, 64), ()])
def test_quantize_not_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        lora_ext.quantize_nf4(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_quantize_bad_dtype(dtype):
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        lora_ext.quantize_nf4(torch.ones(4, 64, dtype=dtype))


def test_quantize_empty_and_non_tensor():
    with pytest.raises(ValueError, match="empty"):
        lora_ext.quantize_nf4(torch.randn(0, 64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lora_ext.quantize_nf4([[1.0, 2.0]])


def _q(double_quant=True):
    return lora_ext.quantize_nf4(torch.randn(10, 70), 64, double_quant)


def test_nf4weight_packed_wrong_length():
    q = _q()
    with pytest.raises(ValueError, match=r"\(N\*K\+1\)//2 = 350 bytes, got 349"):
        lora_ext.NF4Weight(q.packed[:-1], q.absmax, 64, q.shape, q.dtype, q.nested_absmax, q.nested_code, q.offset)
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.lora_ext.nf4_dequantize(q.packed[:-1], *q.op_args()[1:], [10, 70], torch.float32)


def test_nf4weight_inconsistent_state():
    q = _q()
    with pytest.raises(ValueError, match="absmax must hold"):
        lora_ext.NF4Weight(q.packed, q.absmax[:-1], 64, q.shape, q.dtype, q.nested_absmax, q.nested_code, q.offset)
    with pytest.raises(ValueError, match="absmax must hold"):  # blocksize disagrees with the scales
        lora_ext.NF4Weight(q.packed, q.absmax, 128, q.shape, q.dtype, q.nested_absmax, q.nested_code, q.offset)
    with pytest.raises(TypeError, match="double-quantized absmax must be uint8"):
        lora_ext.NF4Weight(q.packed, q.absmax.float(), 64, q.shape, q.dtype, q.nested_absmax, q.nested_code, q.offset)
    with pytest.raises(ValueError, match="come together"):
        lora_ext.NF4Weight(q.packed, q.absmax, 64, q.shape, q.dtype, q.nested_absmax, q.nested_code, None)
    p = _q(False)
    with pytest.raises(TypeError, match="float32 without double quantization"):
        lora_ext.NF4Weight(p.packed, p.absmax.half(), 64, p.shape, p.dtype)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        lora_ext.NF4Weight(p.packed, p.absmax, 48, p.shape, p.dtype)
    with pytest.raises(ValueError, match="2-D"):
        lora_ext.NF4Weight(p.packed, p.absmax, 64, (700,), p.dtype)


@pytest.mark.parametrize("op_bad", ["blocksize", "shape", "absmax_len"])
def test_dequantize_op_checks(op_bad):
    q = _q(False)
    args = list(q.op_args())
    shape = [10, 70]
    if op_bad == "blocksize":
        args[5] = 96
    elif op_bad == "shape":
        shape = [10, 71]
    else:
        args[1] = args[1][:-1]
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.lora_ext.nf4_dequantize(*args, shape, torch.float32)


# ------------------------------------------------------------------ checkpoints


def _layer_and_sd():
    torch.manual_seed(0)
    src = LinearNF4.from_linear(torch.nn.Linear(70, 10))
    dst = LinearNF4.from_linear(torch.nn.Linear(70, 10))
    return dst, src.state_dict()


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, snap):
    now = m.state_dict()
    assert list(now) == list(snap)
    assert all(torch.equal(now[k], snap[k]) for k in snap)


def _with_meta(sd, **changes):
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    meta.update(changes)
    for k, v in changes.items():
        if v is None:
            del meta[k]
    out = dict(sd)
    out["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: _with_meta(sd, blocksize=128), "absmax must hold"),
        (lambda sd: _with_meta(sd, blocksize=48), "blocksize 48"),
        (lambda sd: _with_meta(sd, shape=[70, 10]), r"holds a \[70, 10\] weight"),
        (lambda sd: _with_meta(sd, shape=[10, 71]), "bytes"),
        (lambda sd: _with_meta(sd, quant_type="fp4"), "only 'nf4'"),
        (lambda sd: _with_meta(sd, dtype="int8"), "dtype 'int8'"),
        (lambda sd: _with_meta(sd, nested_offset=None), "nested_offset"),
        (lambda sd: _with_meta(sd, nested_offset="nan"), "nested_offset"),
        (lambda sd: {**sd, "weight": sd["weight"][:-1]}, "bytes"),
        (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].float()}, "uint8"),
        (lambda sd: {**sd, "weight.nested_absmax": torch.ones(2)}, "nested_absmax"),
        (lambda sd: {**sd, "weight.quant_map": torch.linspace(-1, 1, 16)}, "quant_map"),
        (lambda sd: {k: v for k, v in sd.items() if k != "weight.absmax"}, "lacks weight.absmax"),
        (
            lambda sd: {**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)},
            "JSON",
        ),
    ],
    ids=[
        "json-blocksize-disagrees", "json-blocksize-unsupported", "json-shape-transposed", "json-shape-odd",
        "fp4", "dtype", "no-offset", "offset-nan", "packed-short", "absmax-dtype", "nested-len", "quant-map",
        "missing-absmax", "bad-json",
    ],
)  # fmt: skip
def test_bad_checkpoint_is_refused_and_nothing_changes(corrupt, message):
    dst, sd = _layer_and_sd()
    snap = _snapshot(dst)
    with pytest.raises(RuntimeError, match=message):
        dst.load_state_dict(corrupt(sd))
    _assert_unchanged(dst, snap)


def test_good_checkpoint_loads():
    dst, sd = _layer_and_sd()
    dst.load_state_dict(sd)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())


def test_checkpoint_without_double_quant_switches_format():
    torch.manual_seed(1)
    src = LinearNF4.from_linear(torch.nn.Linear(70, 10), double_quant=False)
    dst = LinearNF4(70, 10, double_quant=True)
    dst.load_state_dict(src.state_dict())
    assert not dst.double_quant
    assert torch.equal(dst.dequantize(torch.float32), src.dequantize(torch.float32))


def test_quantize_model_bad_blocksize_leaves_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="blocksize"):
        lora_ext.quantize_model(model, blocksize=100)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], torch.nn.Linear)
