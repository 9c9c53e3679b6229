"""Mixed-adapter batches: one LoRA linear layer, one adapter per batch row, n = 1, 4, 16 adapters.

Methods (same x, W and factors; no bias, rows split round-robin over the adapters):

  base          ``F.linear(x, W)``: the frozen layer
  dense         ``lora_ext.lora_linear`` with one adapter for every row: the floor of a mixed batch
  lora_ext      ``lora_ext.lora_linear_mixed`` with the n stacked adapters and a per-row index
  peft          ``peft.tuners.lora.Linear`` holding the n adapters, called with ``adapter_names=``
                (PEFT's per-adapter loop over sub-batches; in eval mode: PEFT refuses training)

Passes: ``forward`` (torch.no_grad) and ``fwd+bwd`` (one training step of the layer:
gradients for x and every adapter's factors; W frozen; PEFT's layer in eval mode, which
only disables its dropout). ``vs_dense``: time / dense's for the same pass; ``vs_peft``:
time / PEFT's. The rows go to mixed.csv.

Run: ``python -m benchmarks.run --only mixed`` (``--quick``: a small shape, few runs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import common
from .common import Settings
from .fixtures import make_peft_layer

ADAPTERS = (1, 4, 16)


def shape(s: Settings) -> tuple[int, int, int, int, int]:
    """(rows B, tokens per row T, K, N, r): M = B * T rows of x."""
    if s.device == "cuda":
        return (16, 512, 4096, 4096, 16) if not s.quick else (16, 128, 4096, 4096, 16)
    return (16, 128, 1024, 1024, 16) if not s.quick else (16, 16, 256, 256, 8)


def jobs(s: Settings) -> int:
    return len(ADAPTERS)


def _peft_layer(weight, factors: list[tuple[torch.Tensor, torch.Tensor]], alpha: float):
    """A PEFT Linear with adapters a0..a{n-1} holding ``factors``; None without peft."""
    layer = make_peft_layer(weight, factors[0][0], factors[0][1], alpha)
    if layer is None:
        return None
    import peft

    r = factors[0][0].shape[0]
    for i in range(1, len(factors)):
        layer.update_layer(f"a{i}", r, alpha, config=peft.LoraConfig(r=r, lora_alpha=alpha))
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for i, (a, b) in enumerate(factors):
            name = "default" if i == 0 else f"a{i}"
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    layer.set_adapter(["default", *[f"a{i}" for i in range(1, len(factors))]])  # all trainable
    return layer.eval()


def bench_n(n: int, s: Settings) -> list[dict[str, Any]]:
    lx = common.lora_ext()
    dev, dt = s.device, s.dtype
    bsz, seq, k, nout, r = shape(s)
    rnd = common.randn(dev, dt, seed=n)
    alpha = 2.0 * r
    scale = alpha / r
    weight = rnd(nout, k, std=k**-0.5)
    factors = [(rnd(r, k, std=k**-0.5), rnd(nout, r, std=r**-0.5)) for _ in range(n)]
    for a, b in factors:
        a.requires_grad_(True)
        b.requires_grad_(True)
    names_peft = ["default" if i % n == 0 else f"a{i % n}" for i in range(bsz)]
    row_index = torch.arange(bsz, device=dev) % n
    index = row_index.repeat_interleave(seq)  # per token, [B*T]
    xs = common.Rotating(lambda: rnd(bsz, seq, k).requires_grad_(True), s.rotate)
    gs = common.Rotating(lambda: rnd(bsz, seq, nout), s.rotate)
    lora_A = torch.stack([a for a, _ in factors]).detach().requires_grad_(True)
    lora_B = torch.stack([b for _, b in factors]).detach().requires_grad_(True)

    methods: dict[str, tuple[Any, list[torch.Tensor]]] = {
        "base": (lambda x: F.linear(x, weight), []),
        "dense": (lambda x: lx.lora_linear(x, weight, factors[0][0], factors[0][1], scale), list(factors[0])),
        "lora_ext": (lambda x: lx.lora_linear_mixed(x, weight, lora_A, lora_B, scale, index), [lora_A, lora_B]),
    }
    peft_layer = _peft_layer(weight, [(a.detach(), b.detach()) for a, b in factors], alpha)
    if peft_layer is not None:
        peft_params = [p for p in peft_layer.parameters() if p.requires_grad]
        methods["peft"] = (lambda x: peft_layer(x, adapter_names=names_peft), peft_params)

    def fwd_step(fn):
        def step(mark):
            with torch.no_grad():
                fn(xs.next())
            mark("forward")

        return step

    fwd = common.time_ops({m: fwd_step(fn) for m, (fn, _) in methods.items()}, s)
    train = common.time_ops({m: common.train_step(fn, p, xs, gs) for m, (fn, p) in methods.items()}, s)
    label = "lora_ext" if lx.extension_loaded() else "lora_ext[fallback]"
    rows: list[dict[str, Any]] = []
    for op, timings, pick in (
        ("forward", fwd, lambda t: t.ms["forward"]),
        ("fwd+bwd", train, lambda t: sum(t.ms.values())),
    ):
        dense_ms = pick(timings["dense"])
        peft_ms = pick(timings["peft"]) if "peft" in timings else None
        for m, t in timings.items():
            ms = pick(t)
            rows.append(
                {
                    "bench": "mixed",
                    "M": bsz * seq,
                    "rows": bsz,
                    "K": k,
                    "N": nout,
                    "r": r,
                    "n_adapters": n,
                    "dtype": s.dtype_name,
                    "device": dev,
                    "method": label if m == "lora_ext" else m,
                    "op": op,
                    "ms": ms,
                    "vs_dense": ms / dense_ms,
                    "vs_peft": None if peft_ms is None else ms / peft_ms,
                    "runs": t.runs,
                }
            )
    return rows


def run(s: Settings, progress: common.Progress | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in ADAPTERS:
        rows += bench_n(n, s)
        if progress is not None:
            progress.update(f"mixed n={n}")
    return rows
