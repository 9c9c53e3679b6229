"""Per-call overhead of one LoRA layer at small M (decode-sized calls of tens of µs).

K = N = 512, r = 16, M = 1, 16, 128; one training step of one layer each call
(forward, then ``torch.autograd.grad`` for x and the trainable factors; x
requires grad, W frozen), same weights for every contender:

  floor           ``F.linear(x, W)``: what the frozen layer costs
  peft            ``peft.tuners.lora.Linear`` around the ``nn.Linear``
  lora_ext_layer  ``lora_ext.LoraLinear`` (the module inject_adapter puts in a model)
  lora_ext_op     ``lora_ext.lora_linear`` alone (the op, no module)

Columns: µs per call, the overhead over the floor, the ratio to PEFT's layer and
the share of PEFT's overhead left. A run is many calls back to back (their mean);
the figure is the least of several medians (benchmarks/common.py: time_ops).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import common
from .common import Settings
from .fixtures import make_peft_layer

K = N = 512
R = 16
MS = (1, 16, 128)


def _inner(s: Settings) -> tuple[int, int]:
    """(calls per run, medians taken)."""
    return (20, 2) if s.quick else (100, 5)


def bench_m(m: int, s: Settings) -> list[dict[str, Any]]:
    lx = common.lora_ext()
    dev, dt = s.device, s.dtype
    rnd = common.randn(dev, dt)
    scale, alpha = 2.0, 2.0 * R
    weight = rnd(N, K, std=K**-0.5)
    lora_A = rnd(R, K, std=K**-0.5).requires_grad_(True)
    lora_B = rnd(N, R, std=R**-0.5).requires_grad_(True)
    base = nn.Linear(K, N, bias=False, device=dev, dtype=dt)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.requires_grad_(False)
    layer = lx.LoraLinear(
        base, "default", r=R, lora_alpha=alpha, weights={"lora_A.weight": lora_A, "lora_B.weight": lora_B}
    ).train()
    contenders: dict[str, tuple[Any, list[torch.Tensor]]] = {
        "floor": (lambda x: F.linear(x, weight), []),
        "lora_ext_layer": (layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]),
        "lora_ext_op": (lambda x: lx.lora_linear(x, weight, lora_A, lora_B, scale), [lora_A, lora_B]),
    }
    peft = make_peft_layer(weight, lora_A, lora_B, alpha)
    if peft is not None:
        contenders["peft"] = (peft.train(), [peft.lora_A["default"].weight, peft.lora_B["default"].weight])
    xs = common.Rotating(lambda: rnd(m, K).requires_grad_(True), s.rotate)
    gs = common.Rotating(lambda: rnd(m, N, std=N**-0.5), s.rotate)

    inner, repeats = _inner(s)
    short = dataclasses.replace(s, budget_s=s.budget_s / repeats)
    steps = {n: common.train_step(fn, ps, xs, gs) for n, (fn, ps) in contenders.items()}
    t = common.time_ops(steps, short, inner=inner, repeats=repeats)
    us = {n: sum(t[n].ms.values()) * 1e3 for n in contenders}
    rows = []
    for name in ("floor", "peft", "lora_ext_layer", "lora_ext_op"):
        if name not in us:
            continue
        row: dict[str, Any] = {
            "bench": "percall",
            "M": m,
            "K": K,
            "N": N,
            "r": R,
            "dtype": s.dtype_name,
            "device": dev,
            "method": name,
            "fwd_bwd_us": us[name],
            "over_floor_us": us[name] - us["floor"],
            "calls_per_run": inner,
            "runs": t[name].runs,
            "medians": repeats,
        }
        if "peft" in us:
            row["vs_peft"] = us[name] / us["peft"]
            if us["peft"] > us["floor"]:
                row["peft_overhead_share"] = row["over_floor_us"] / (us["peft"] - us["floor"])
        rows.append(row)
    return rows


def jobs(s: Settings) -> int:
    return len(MS)


def run(s: Settings, progress: common.Progress | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m in MS:
        rows += bench_m(m, s)
        if progress is not None:
            progress.update(f"per call M={m}")
    return rows
