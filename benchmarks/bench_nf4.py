"""QLoRA: ``lora_ext.lora_linear_nf4`` against bitsandbytes ``Linear4bit`` + a PEFT LoRA branch; NF4 storage.

One layer (default M=512, K=N=1024, r=16; quick: M=64, K=N=256), one training step
each call (x, A, B require grad, the weight frozen), interleaved (benchmarks/common.py):

  base        ``F.linear(x, W)`` with the full-precision W: the floor
  bnb+peft    bitsandbytes ``Linear4bit`` (nf4, double quant, compute dtype = x's) plus
              PEFT's branch ``lora_B(lora_A(x)) * scaling`` (what ``peft.get_peft_model`` builds)
  lora_ext    ``lora_ext.lora_linear_nf4`` (compiled kernel if loaded, else the fallback)

Storage rows (``bench = nf4_bits``): bits per parameter of the quantized weight
(``lora_ext.memory_report``, blocksize 64, double quant) for the layer and for a
4096×4096 layer (the QLoRA paper's 4.127).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import common
from .common import Settings


def cases(s: Settings) -> list[tuple[int, int, int, int]]:
    """(M, K, N, r) of the timed layers."""
    return [(64, 256, 256, 16)] if s.quick else [(512, 1024, 1024, 16)]


def _bnb_layer(w: torch.Tensor, dtype: torch.dtype, device: str):
    import bitsandbytes as bnb

    n, k = w.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.cpu().clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to(device)


def bench_case(m: int, k: int, n: int, r: int, s: Settings) -> list[dict[str, Any]]:
    lx = common.lora_ext()
    dev, dt = s.device, s.dtype
    rnd = common.randn(dev, dt)
    w = rnd(n, k, std=k**-0.5)
    a = rnd(r, k, std=k**-0.5).requires_grad_(True)
    b = rnd(n, r, std=r**-0.5).requires_grad_(True)
    qw = lx.quantize_nf4(w, 64, True)
    xs = common.Rotating(lambda: rnd(m, k).requires_grad_(True), s.rotate)
    gs = common.Rotating(lambda: rnd(m, n, std=n**-0.5), s.rotate)
    fns: dict[str, tuple[Any, list[torch.Tensor]]] = {
        "base": (lambda x: F.linear(x, w), []),
        "lora_ext": (lambda x: lx.lora_linear_nf4(x, qw, a, b, 2.0), [a, b]),
    }
    head = {"bench": "nf4", "M": m, "K": k, "N": n, "r": r, "dtype": s.dtype_name, "device": dev}
    rows: list[dict[str, Any]] = []
    try:
        layer = _bnb_layer(w, dt, dev)
        fns["bnb+peft"] = (lambda x: layer(x) + F.linear(F.linear(x, a), b) * 2.0, [a, b])
    except Exception as exc:  # noqa: BLE001  (bitsandbytes missing or without this device: reported, not fatal)
        rows.append({**head, "method": "bnb+peft", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' ops must not be traced
        t = common.time_ops({name: common.train_step(fn, ps, xs, gs) for name, (fn, ps) in fns.items()}, s)
    ms = {name: sum(t[name].ms.values()) for name in fns}
    for name in fns:
        row = {
            **head,
            "method": name,
            "fwd_bwd_ms": ms[name],
            "runs": t[name].runs,
            "ratio_fwd_bwd": ms[name] / ms["base"],
        }
        if "bnb+peft" in ms:
            row["vs_bnb_peft"] = ms[name] / ms["bnb+peft"]
        rows.append(row)
    rows.append(_bits_row(lx.LinearNF4.from_nf4(qw), f"{n}×{k}", s))
    return rows


def _bits_row(module: torch.nn.Module, layer: str, s: Settings) -> dict[str, Any]:
    rep = common.lora_ext().memory_report(module)
    return {
        "bench": "nf4_bits",
        "layer": layer,
        "device": s.device,
        "blocksize": 64,
        "double_quant": True,
        "bits_per_param": rep["quantized_bits_per_param"],
    }


def jobs(s: Settings) -> int:
    return len(cases(s)) + int(not s.quick)


def run(s: Settings, progress: common.Progress | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m, k, n, r in cases(s):
        rows += bench_case(m, k, n, r, s)
        if progress is not None:
            progress.update(f"nf4 M={m} K={k} N={n}")
    if not s.quick:
        big = common.lora_ext().LinearNF4.from_linear(torch.nn.Linear(4096, 4096, bias=False))
        rows.append(_bits_row(big, "4096×4096", s))
        if progress is not None:
            progress.update("nf4 storage 4096×4096")
    return rows
