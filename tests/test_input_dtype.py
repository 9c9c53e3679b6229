"""nn.Linear's and PEFT's dtype rule outside autocast: an input of another dtype raises, on every path.

The file also runs itself in fallback mode (LORA_EXT_DISABLE_EXTENSION=1), so the
rule holds without the compiled library too.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import IN_FALLBACK_MODE, run_in_fallback_mode
from torch import nn

import lora_ext


def _layer(n_adapters: int = 1) -> lora_ext.LoraLinear:
    layer = lora_ext.LoraLinear(nn.Linear(8, 4), "a0", r=2, init_lora_weights=False)
    for i in range(1, n_adapters):
        layer.add_adapter(f"a{i}", 2, 2.0, init_lora_weights=False)
    layer.set_active(tuple(f"a{i}" for i in range(n_adapters)))
    return layer


def _merged():
    layer = _layer()
    layer.merge()
    return layer


def _disabled():
    layer = _layer()
    layer._disable_adapters = True
    return layer


def _hooked():
    layer = _layer()
    layer.base_layer.register_forward_hook(lambda mod, args, out: out)  # e.g. accelerate's offload hooks
    return layer


PATHS = {
    "fused": _layer,
    "two_adapters": lambda: _layer(2),
    "merged": _merged,
    "disabled": _disabled,
    "hooked": _hooked,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.bfloat16], ids=["int64", "fp64", "bf16"])
def test_wrong_input_dtype_raises_type_error_on_every_path(path, dtype):
    layer = PATHS[path]()
    x = torch.ones(3, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"input x has dtype {dtype} but the layer's weight is torch.float32"):
        layer(x)
    y = layer(torch.ones(3, 8))  # the right dtype runs
    assert y.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype, as for nn.Linear
        assert layer(x.float()).dtype == torch.bfloat16


def test_injected_model_and_accelerated_peft_model_raise_too():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["0", "2"]))
        lora_ext.integrations.peft.accelerate(pm)
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=2, target_modules=["0", "2"]))
    x = torch.ones(2, 8, dtype=torch.int64)
    for m in (model, pm):
        with pytest.raises(TypeError, match="input x has dtype torch.int64"):
            m(x)


def test_nf4_layer_refuses_a_non_float_input():
    """bitsandbytes' rule for a 4-bit base: a float input is cast to the compute dtype, an integer one is refused."""
    base = lora_ext.LinearNF4.from_linear(nn.Linear(64, 16))
    layer = lora_ext.LoraLinearNF4(base, "default", r=2)
    with pytest.raises(TypeError, match="input x has dtype torch.int64"):
        layer(torch.ones(3, 64, dtype=torch.int64))
    assert layer(torch.ones(3, 64, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
def test_dtype_rule_holds_in_fallback_mode():
    tail = run_in_fallback_mode(["tests/test_input_dtype.py"], timeout=600)
    assert " passed" in tail
