"""merge_/unmerge_ against the floor (a device copy of W), PEFT's merge and plain ``addmm_``; bf16 drift.

Speed: every method rewrites W in place, so each moves at least 2·N·K·elem
bytes (read W, write W); bandwidth = that / median time. The floor is
``dst.copy_(W)``, which moves the same bytes. Methods:

  copy            ``dst.copy_(W)``: the floor
  lora_ext        ``lora_ext.merge_`` then ``lora_ext.unmerge_`` (fp32 accumulation, one rounding),
                  and ``lora_ext.merged_weight`` (out of place: reads W, writes a new W)
  lora_ext_exact  ``merge_``/``unmerge_`` with a ``MergeRecord`` (bit-exact unmerge); its rows carry
                  ``record_bytes`` and ``record_frac`` (÷ W's bytes) for these factors (|ΔW| ≈ 2·|W|)
  peft            ``peft.tuners.lora.Linear.merge()`` then ``.unmerge()`` (delta ``B@A·s`` built
                  as a full N×K tensor in the adapter dtype, then added to W)
  torch_addmm     ``W.addmm_(B, A, alpha=±s)`` (plain PyTorch, in W's dtype)

merge and unmerge alternate so W stays bounded; they are timed separately.
copy, lora_ext and addmm_ run interleaved (one call each in turn, so a busy spell of
the shared machine slows all three) and keep the least of three medians, as the
per-call table does; lora_ext_exact and peft (tens of ms a call) are timed on their own.
Inputs rotate over several independent (W, A, B) sets. ``vs_addmm``: time ÷
``addmm_``'s for the same op. On the CPU the 4096×4096 case runs in fp32,
bf16 and fp16 whatever the run's dtype.

Record size (``merge_record`` rows): the exact merge's record as a fraction of W's bytes for
|ΔW| = ratio × |W| (rms), ratio 1e-3 and 1e-2 (trained-LoRA-like), 0.1 and 1 (adversarial),
fp32/bf16/fp16, W ~ N(0, 0.02).

Drift: a bf16 W with bf16 factors, ``n`` merge+unmerge cycles, then the
difference to the original W (max |ΔW| / max |W|, ‖ΔW‖/‖W‖, fraction of
elements changed), for lora_ext, PEFT and addmm_. lora_ext rounds once per
op (W + s·BA computed in fp32); PEFT rounds B@A·s to bf16 first, then rounds
the sum again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import common
from .common import Settings
from .fixtures import make_peft_layer


def speed_cases(s: Settings) -> list[tuple[int, int, int, torch.dtype]]:
    """(N, K, r, dtype) of the speed table."""
    if s.device == "cuda":
        shapes = (
            [(4096, 4096, 16)]
            if s.quick
            else [(4096, 4096, 16), (4096, 4096, 64), (11008, 4096, 16), (4096, 14336, 16)]
        )
        return [(*sh, s.dtype) for sh in shapes]
    if s.quick:
        return [(256, 256, 8, s.dtype), (1024, 1024, 16, s.dtype)]
    extra = [(4096, 4096, 16, dt) for dt in (torch.float32, torch.bfloat16, torch.float16) if dt != s.dtype]
    return [(1024, 1024, 16, s.dtype), (4096, 4096, 16, s.dtype), *extra]


def drift_setup(device: str, quick: bool) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """((N, K, r), cycle checkpoints) of the drift table."""
    if quick:
        return (256, 256, 8), (1, 10, 100)
    return ((4096, 4096, 16) if device == "cuda" else (512, 512, 16)), (1, 100, 1000)


def _factors(n: int, k: int, r: int, device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(device=device, dtype=dtype)
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(device=device, dtype=dtype)
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(device=device, dtype=dtype)
    return w, a, b


def bench_speed(n: int, k: int, r: int, dt: torch.dtype, s: Settings, progress) -> list[dict[str, Any]]:
    lx = common.lora_ext()
    dev = s.device
    scale = 2.0
    elem = torch.empty((), dtype=dt).element_size()
    nbytes = 2 * n * k * elem
    sets = [_factors(n, k, r, dev, dt, seed) for seed in range(s.rotate)]
    label = "lora_ext" if lx.extension_loaded() else "fallback"
    rows: list[dict[str, Any]] = []

    def row(method: str, phases: dict[str, float], runs: int, mem: int | None, **extra) -> None:
        for phase, ms in phases.items():
            rows.append(
                {
                    "bench": "merge",
                    "N": n,
                    "K": k,
                    "r": r,
                    "dtype": common.DTYPE_NAMES[dt],
                    "device": dev,
                    "method": method,
                    "op": phase,
                    "ms": ms,
                    "GB_per_s": nbytes / (ms * 1e6),
                    "runs": runs,
                    "peak_mem_MiB": None if mem is None else mem / common.MiB,
                    **extra,
                }
            )

    # floor: device copy of W
    dsts = [torch.empty_like(w) for w, _, _ in sets]
    idx = {"i": -1}

    def nxt() -> int:
        idx["i"] = (idx["i"] + 1) % len(sets)
        return idx["i"]

    def copy_step(mark):
        i = nxt()
        dsts[i].copy_(sets[i][0])
        mark("copy")

    def ext_step(mark):
        w, a, b = sets[nxt()]
        lx.merge_(w, a, b, scale)
        mark("merge")
        lx.unmerge_(w, a, b, scale)
        mark("unmerge")
        lx.merged_weight(w, a, b, scale)
        mark("merged_weight")

    def addmm_step(mark):
        w, a, b = sets[nxt()]
        w.addmm_(b, a, alpha=scale)
        mark("merge")
        w.addmm_(b, a, alpha=-scale)
        mark("unmerge")

    # the floor, lora_ext and addmm_ interleaved (a busy spell slows all three), best of 3 medians
    repeats = 3
    short = dataclasses.replace(s, budget_s=s.budget_s / repeats)
    t = common.time_ops({"copy": copy_step, "ext": ext_step, "addmm": addmm_step}, short, repeats=repeats)
    row("copy", t["copy"].ms, t["copy"].runs, common.peak_memory(lambda: copy_step(lambda _n: None), dev))
    w, a, b = sets[0]
    row(label, t["ext"].ms, t["ext"].runs, common.peak_memory(lambda: lx.merge_(w, a, b, scale), dev))
    lx.unmerge_(w, a, b, scale)
    mem = common.peak_memory(lambda: w.addmm_(b, a, alpha=scale), dev)
    w.addmm_(b, a, alpha=-scale)
    row("torch_addmm", t["addmm"].ms, t["addmm"].runs, mem)
    if progress is not None:
        progress.update(f"merge N={n} K={k} {label}")

    # fresh weights: the plain cycles above left each W at a fixed point of its own round trip,
    # where almost nothing needs recording; the exact cycles leave W unchanged
    exact_sets = [_factors(n, k, r, dev, dt, seed) for seed in range(s.rotate)]
    recs = [lx.MergeRecord() for _ in exact_sets]
    sizes = {}

    def exact_step(mark):
        i = nxt()
        w, a, b = exact_sets[i]
        lx.merge_(w, a, b, scale, record=recs[i])
        mark("merge")
        sizes["bytes"] = recs[i].nbytes
        lx.unmerge_(w, a, b, scale, record=recs[i])
        mark("unmerge")

    t = common.time_op(exact_step, s)
    w, a, b = exact_sets[0]
    mem = common.peak_memory(lambda: lx.merge_(w, a, b, scale, record=recs[0]), dev)
    lx.unmerge_(w, a, b, scale, record=recs[0])
    row(f"{label}_exact", t.ms, t.runs, mem, record_bytes=sizes["bytes"], record_frac=sizes["bytes"] / (nbytes / 2))
    if progress is not None:
        progress.update(f"merge N={n} K={k} {label} exact")

    layers = [make_peft_layer(w, a, b, scale * r) for w, a, b in sets]
    if layers[0] is not None:

        def peft_step(mark):
            layer = layers[nxt()]
            layer.merge()
            mark("merge")
            layer.unmerge()
            mark("unmerge")

        t = common.time_op(peft_step, s)
        mem = common.peak_memory(layers[0].merge, dev)
        layers[0].unmerge()
        row("peft", t.ms, t.runs, mem)
    if progress is not None:
        progress.update(f"merge N={n} K={k} peft")

    if progress is not None:
        progress.update(f"merge N={n} K={k} addmm_")

    copy_bw = next(r_["GB_per_s"] for r_ in rows if r_["method"] == "copy")
    addmm = {r_["op"]: r_["ms"] for r_ in rows if r_["method"] == "torch_addmm"}
    for r_ in rows:
        r_["frac_of_copy_bw"] = r_["GB_per_s"] / copy_bw
        if r_["op"] in addmm:
            r_["vs_addmm"] = r_["ms"] / addmm[r_["op"]]
    return rows


def bench_drift(n: int, k: int, r: int, checkpoints: tuple[int, ...], device: str) -> list[dict[str, Any]]:
    """bf16 drift of W after ``c`` merge/unmerge cycles, for each checkpoint ``c``."""
    lx = common.lora_ext()
    dt = torch.bfloat16
    scale = 2.0
    w0, a, b = _factors(n, k, r, device, dt, seed=123)
    w0_64 = w0.double()
    label = "lora_ext" if lx.extension_loaded() else "fallback"

    def stats(w: torch.Tensor) -> dict[str, float]:
        d = w.double() - w0_64
        return {
            "max_abs_over_max_w": (d.abs().max() / w0_64.abs().max()).item(),
            "rel_fro": (d.norm() / w0_64.norm()).item(),
            "frac_changed": (d != 0).double().mean().item(),
        }

    def cycle_ext(w):
        lx.merge_(w, a, b, scale)
        lx.unmerge_(w, a, b, scale)

    peft_layer = make_peft_layer(w0, a, b, scale * r)

    def cycle_addmm(w):
        w.addmm_(b, a, alpha=scale)
        w.addmm_(b, a, alpha=-scale)

    def cycle_exact(w):
        rec = lx.MergeRecord()
        lx.merge_(w, a, b, scale, record=rec)
        lx.unmerge_(w, a, b, scale, record=rec)

    methods: list[tuple[str, Any, Any]] = [
        (label, w0.clone(), cycle_ext),
        (f"{label}_exact", w0.clone(), cycle_exact),
        ("torch_addmm", w0.clone(), cycle_addmm),
    ]
    if peft_layer is not None:

        def cycle_peft(_w):
            peft_layer.merge()
            peft_layer.unmerge()

        methods.insert(1, ("peft", peft_layer.base_layer.weight.data, cycle_peft))
    rows = []
    for name, w, cycle in methods:
        done = 0
        for c in checkpoints:
            with torch.no_grad():
                while done < c:
                    cycle(w)
                    done += 1
            rows.append(
                {
                    "bench": "merge_drift",
                    "N": n,
                    "K": k,
                    "r": r,
                    "dtype": "bf16",
                    "device": device,
                    "method": name,
                    "cycles": c,
                    **stats(w),
                }
            )
    return rows


RECORD_RATIOS = (1e-3, 1e-2, 1e-1, 1.0)


def bench_record_size(device: str, quick: bool) -> list[dict[str, Any]]:
    """Record bytes of one exact merge as a fraction of W's bytes, per |ΔW|/|W| ratio and dtype."""
    lx = common.lora_ext()
    n = k = 256 if quick else (4096 if device == "cuda" else 1024)
    r, scale = 16, 2.0
    rows = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for ratio in RECORD_RATIOS:
            g = torch.Generator().manual_seed(7)
            w = torch.randn(n, k, generator=g) * 0.02
            a = torch.randn(r, k, generator=g) * k**-0.5
            b = torch.randn(n, r, generator=g)
            b = b * (ratio * 0.02 / (scale * b @ a).pow(2).mean().sqrt().item())
            w, a, b = (t.to(device=device, dtype=dt) for t in (w, a, b))
            rec = lx.MergeRecord()
            lx.merge_(w, a, b, scale, record=rec)
            w_bytes = w.numel() * w.element_size()
            rows.append(
                {
                    "bench": "merge_record",
                    "N": n,
                    "K": k,
                    "r": r,
                    "dtype": common.DTYPE_NAMES[dt],
                    "device": device,
                    "ratio": ratio,
                    "elements_recorded": rec.count / w.numel(),
                    "record_bytes": rec.nbytes,
                    "record_frac": rec.nbytes / w_bytes,
                }
            )
    return rows


def jobs(s: Settings) -> int:
    return 4 * len(speed_cases(s)) + 2


def run(s: Settings, progress=None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n, k, r, dt in speed_cases(s):
        rows += bench_speed(n, k, r, dt, s, progress)
    (n, k, r), checkpoints = drift_setup(s.device, s.quick)
    rows += bench_drift(n, k, r, checkpoints, s.device)
    if progress is not None:
        progress.update("bf16 drift")
    rows += bench_record_size(s.device, s.quick)
    if progress is not None:
        progress.update("exact merge record size")
    return rows
