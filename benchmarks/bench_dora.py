"""DoRA layer forward + backward: lora_ext's fused DoRA against PEFT's DoRA and against plain LoRA.

One ``nn.Linear`` base of shape ``[N, K]`` with one adapter of rank r, a training
step on x ``[M, K]`` (forward, then gradients of x and of the trainable tensors):

  base             the frozen ``nn.Linear`` alone (the floor)
  peft_lora        ``peft.tuners.lora.Linear`` (plain LoRA)
  lora_ext_lora    ``lora_ext.LoraLinear`` (the fused LoRA op)
  peft_dora        ``peft.tuners.lora.Linear`` with ``use_dora=True`` (materialises the N×K
                   ``B A`` for the norm at every forward)
  lora_ext_dora    ``lora_ext.LoraLinearDora`` (``dora_linear``: the norm from ``W Aᵀ`` and
                   ``A Aᵀ``, ``‖w‖²`` cached while W is unchanged)

Time: median ms of the ``fwd_train`` and ``backward`` phases (benchmarks/common.py
``time_ops``, contenders interleaved); memory: the high-water mark above the inputs of
one forward + backward (``peak_memory``). ``vs_base``: time ÷ the base layer's, same run.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from . import common
from .common import Settings

METHODS = ("base", "peft_lora", "lora_ext_lora", "peft_dora", "lora_ext_dora")


def cases(s: Settings) -> list[tuple[int, int, int, int]]:
    """(M, K, N, r) of the table."""
    if s.device == "cuda":
        return [(8192, 4096, 4096, 16)] if s.quick else [(8192, 4096, 4096, 16), (2048, 4096, 11008, 16)]
    if s.quick:
        return [(256, 256, 256, 8)]
    return [(2048, 1024, 1024, 16), (8192, 1024, 1024, 16)]


def _layers(k: int, n: int, r: int, s: Settings) -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    """method -> (module, trainable tensors), all on the same base weight and factors."""
    lx = common.lora_ext()
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=True).to(device=s.device, dtype=s.dtype).requires_grad_(False)
    out: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {"base": (base, [])}
    for dora in (False, True):
        ours = lx.LoraLinearDora(copy.deepcopy(base))
        ours.add_adapter("default", r, 2 * r, init_lora_weights=False, use_dora=dora)
        ours.set_active(("default",))
        out["lora_ext_dora" if dora else "lora_ext_lora"] = (ours, [p for p in ours.parameters() if p.requires_grad])
        try:
            import peft
            from peft.tuners.lora import Linear as PeftLinear
        except Exception:  # noqa: BLE001  (no peft: its rows are left out, nothing is faked)
            continue
        kwargs = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, use_dora=dora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl = PeftLinear(copy.deepcopy(base), "default", config=peft.LoraConfig(**kwargs), **kwargs)
        with torch.no_grad():  # the same factors and magnitude as ours
            pl.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
            pl.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
            if dora:
                pl.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector["default"].weight)
        pl.to(device=s.device)
        out["peft_dora" if dora else "peft_lora"] = (pl, [p for p in pl.parameters() if p.requires_grad])
    return out


def bench_case(m: int, k: int, n: int, r: int, s: Settings, progress=None) -> list[dict[str, Any]]:
    rnd = common.randn(s.device, s.dtype, seed=1)
    layers = _layers(k, n, r, s)
    xs = common.Rotating(lambda: rnd(m, k).requires_grad_(True), s.rotate)
    gs = common.Rotating(lambda: rnd(m, n), s.rotate)
    steps = {name: common.train_step(mod, params, xs, gs) for name, (mod, params) in layers.items()}
    timings = common.time_ops(steps, s)
    base_ms = sum(timings["base"].ms.values())
    rows: list[dict[str, Any]] = []
    for name in METHODS:
        if name not in timings:
            continue
        t = timings[name]
        step = steps[name]
        mem = common.peak_memory(lambda step=step: step(lambda _p: None), s.device)
        total = sum(t.ms.values())
        rows.append(
            {
                "bench": "dora",
                "M": m,
                "K": k,
                "N": n,
                "r": r,
                "dtype": s.dtype_name,
                "device": s.device,
                "method": name,
                "fwd_ms": t.ms.get("fwd_train"),
                "bwd_ms": t.ms.get("backward"),
                "ms": total,
                "vs_base": total / base_ms if base_ms else None,
                "runs": t.runs,
                "peak_mem_MiB": mem / common.MiB,
            }
        )
        if progress is not None:
            progress.update(f"dora M={m} K={k} N={n} {name}")
    return rows


def jobs(s: Settings) -> int:
    return len(METHODS) * len(cases(s))


def run(s: Settings, progress=None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m, k, n, r in cases(s):
        rows += bench_case(m, k, n, r, s, progress)
    return rows


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    rows = [r for r in rows if r.get("bench") == "dora"]
    headers = ["M", "K", "N", "r", "dtype", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "×base", "peak extra MiB"]
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: (r["M"], r["K"], r["N"], r["r"], order.get(r["method"], 9)))
    return headers, [
        [r["M"], r["K"], r["N"], r["r"], r["dtype"], r["method"], r["fwd_ms"], r["bwd_ms"], r["ms"], r["vs_base"],
         r["peak_mem_MiB"]]
        for r in rows
    ]  # fmt: skip
