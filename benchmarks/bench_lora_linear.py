"""LoRA linear, side by side in one process: the frozen base (the floor) and every LoRA implementation.

Methods (same shapes, dtype and weights; no bias, as in Llama projections):

  base                 ``F.linear(x, W)`` with W frozen: the floor every ratio divides by
  torch_unfused        ``F.linear(x, W) + F.linear(F.linear(x, A), B) * s`` (plain PyTorch)
  peft                 ``peft.tuners.lora.Linear`` (pip peft) around an ``nn.Linear``
  peft_compiled        ``torch.compile(peft layer)`` (dynamic=False; compile time reported apart)
  lora_ext[strategy]   ``lora_ext.lora_linear(..., strategy=...)``, compiled kernels,
                       for auto, shrink_expand and merge
  lora_ext[dropout0.1] (CUDA) ``lora_ext.lora_linear(..., dropout_p=0.1)`` (its own output,
                       so no error column)
  lora_ext[chunk=C]    (CUDA, ``--chunk-rows``) shrink_expand with LORA_EXT_CUDA_CHUNK_ROWS=C,
                       the row-chunk size of the backward's low-rank passes
  fallback             ``lora_ext.lora_linear`` with ``LORA_EXT_DISABLE_EXTENSION=1``: the
                       pure-PyTorch fallback as users get it (dispatcher, autograd and all),
                       measured in a subprocess together with its own ``base``; its ratios
                       divide by that base

Passes: ``forward`` is inference (``torch.no_grad``). ``fwd+bwd`` is one training
step of the layer: forward with autograd recording, then
``torch.autograd.grad(y, [x, A, B], g)`` (x requires grad as for any layer but
the first; W frozen); ``bwd`` is the backward part of that same step. Peak
memory is that of one training step (see benchmarks/common.py for how).
``peft_overhead_share`` = (method - base) / (PEFT - base), fwd+bwd.

Run: ``python -m benchmarks.run --only lora_linear --shapes cpu-goal``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import common
from .common import Settings, Shape
from .fixtures import make_peft_layer

LORA_EXT_STRATEGIES = ("auto", "shrink_expand", "merge")
ALL_METHODS = ("base", "torch_unfused", "peft", "peft_compiled", "lora_ext", "fallback")


def _no_mark(_name: str) -> None:
    pass


def flops(sh: Shape, lora: bool) -> tuple[float, float]:
    """Useful FLOP of (forward, backward) for x, A, B gradients (W frozen)."""
    m, k, n, r = sh.m, sh.k, sh.n, sh.r
    fwd = 2.0 * m * n * k
    bwd = 2.0 * m * n * k  # grad x through W
    if lora:
        fwd += 2.0 * m * k * r + 2.0 * m * n * r
        bwd += 2.0 * m * n * r + 2.0 * m * r * k + 2.0 * m * r * k + 2.0 * m * n * r + 2.0 * m * k * r
    return fwd, bwd


def min_bytes(sh: Shape, elem: int, lora: bool) -> tuple[float, float]:
    """Minimum bytes moved by (forward, backward): each operand read or written once."""
    m, k, n, r = sh.m, sh.k, sh.n, sh.r
    ab = 2.0 * r * (k + n) if lora else 0.0
    fwd = (m * k + n * k + m * n) * elem + ab * elem / 2
    bwd = (m * n + n * k + m * k * (2 if lora else 1) + m * k) * elem + ab * elem
    return fwd, bwd


CHUNK_VAR = "LORA_EXT_CUDA_CHUNK_ROWS"


class _SetEnv(torch.autograd.Function):
    """Identity whose backward sets CHUNK_VAR to ``value`` (None: removes it)."""

    @staticmethod
    def forward(ctx, t, value):
        ctx.value = value
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        if ctx.value is None:
            os.environ.pop(CHUNK_VAR, None)
        else:
            os.environ[CHUNK_VAR] = ctx.value
        return g, None


def _with_chunk_rows(rows: int, x: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``call(x)`` with CHUNK_VAR = ``rows`` around its forward and its backward (set when the backward
    reaches the output, removed once it reaches x)."""
    os.environ[CHUNK_VAR] = str(rows)
    try:
        y = call(_SetEnv.apply(x, None) if x.requires_grad else x)
    finally:
        os.environ.pop(CHUNK_VAR, None)
    return _SetEnv.apply(y, str(rows)) if y.requires_grad else y


def _methods(sh: Shape, s: Settings, wanted: set[str], weight, lora_A, lora_B, scale: float):
    """(name, forward(x) -> y, trainable factors) for every wanted method available here."""
    lx = common.lora_ext()
    out: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]] = []
    if "base" in wanted:
        out.append(("base", lambda x: F.linear(x, weight), []))
    if "torch_unfused" in wanted:
        out.append(
            (
                "torch_unfused",
                lambda x: F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * scale,
                [lora_A, lora_B],
            )
        )
    if wanted & {"peft", "peft_compiled"}:
        layer = make_peft_layer(weight, lora_A, lora_B, scale * sh.r)
        if layer is not None:
            params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            if "peft" in wanted:
                out.append(("peft", layer, params))
            compile_here = s.compile == "all" or (s.compile == "goal" and common.is_goal(sh))
            if "peft_compiled" in wanted and compile_here:
                out.append(("peft_compiled", torch.compile(layer, dynamic=False), params))
    if "lora_ext" in wanted or "fallback" in wanted:
        if lx.extension_loaded() and "lora_ext" in wanted:
            for strat in LORA_EXT_STRATEGIES:
                out.append(
                    (
                        f"lora_ext[{strat}]",
                        lambda x, st=strat: lx.lora_linear(x, weight, lora_A, lora_B, scale, strategy=st),
                        [lora_A, lora_B],
                    )
                )
            if s.device == "cuda":
                out.append(
                    (
                        "lora_ext[dropout0.1]",
                        lambda x: lx.lora_linear(x, weight, lora_A, lora_B, scale, dropout_p=0.1),
                        [lora_A, lora_B],
                    )
                )
                for chunk in s.chunk_rows if common.is_goal(sh) else ():
                    out.append(
                        (
                            f"lora_ext[chunk={chunk}]",
                            lambda x, c=chunk: _with_chunk_rows(
                                c,
                                x,
                                lambda x_: lx.lora_linear(x_, weight, lora_A, lora_B, scale, strategy="shrink_expand"),
                            ),
                            [lora_A, lora_B],
                        )
                    )
        elif not lx.extension_loaded():  # this process runs the fallback (no library, or disabled)
            out.append(("fallback", lambda x: lx.lora_linear(x, weight, lora_A, lora_B, scale), [lora_A, lora_B]))
    return out


def bench_shape(sh: Shape, s: Settings, wanted: set[str], progress: common.Progress | None) -> list[dict[str, Any]]:
    dev, dt = s.device, s.dtype
    rnd = common.randn(dev, dt)
    scale = 2.0  # lora_alpha = 2r
    weight = rnd(sh.n, sh.k, std=sh.k**-0.5)
    lora_A = rnd(sh.r, sh.k, std=sh.k**-0.5).requires_grad_(True)
    lora_B = rnd(sh.n, sh.r, std=sh.r**-0.5).requires_grad_(True)  # not zero: a trained adapter
    xs = common.Rotating(lambda: rnd(sh.m, sh.k), s.rotate)
    xs_train = common.Rotating(lambda: rnd(sh.m, sh.k).requires_grad_(True), s.rotate)
    gs = common.Rotating(lambda: rnd(sh.m, sh.n, std=sh.n**-0.5), s.rotate)

    # reference output in fp64 for the sanity column (a wrong method must not look fast)
    x0 = xs.items[0]
    with torch.no_grad():
        w64, a64, b64 = weight.double(), lora_A.double(), lora_B.double()
        ref = F.linear(x0.double(), w64) + F.linear(F.linear(x0.double(), a64), b64) * scale
        base_ref = F.linear(x0.double(), w64)

    elem = torch.empty((), dtype=dt).element_size()
    peaks = common.gpu_peaks(torch.cuda.get_device_name(0)) if dev == "cuda" else None
    lx = common.lora_ext()
    rows: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]] = {}
    for name, fn, params in _methods(sh, s, wanted, weight, lora_A, lora_B, scale):
        row = _row_head(sh, s, name)
        rows[name] = row
        try:
            if name == "peft_compiled":  # the first calls compile (inference graph, then training graph)
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(x0)
                y = fn(xs_train.items[0])
                torch.autograd.grad(y, [xs_train.items[0], *params], gs.items[0])
                common.synchronize(dev)
                row["compile_s"] = time.perf_counter() - t0
            with torch.no_grad():
                target = ref if name != "base" else base_ref
                if "dropout" not in name:  # dropout computes another function
                    row["max_rel_err"] = ((fn(x0).double() - target).abs().max() / target.abs().max()).item()
            live[name] = (fn, params)
        except Exception as exc:  # noqa: BLE001  (one failing method must not sink the run; the row says why)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def infer_step(fn):
        def step(mark):
            with torch.no_grad():
                fn(xs.next())
            mark("forward")

        return step

    def train_step(fn, params):
        return common.train_step(fn, params, xs_train, gs)

    t_inf = common.time_ops({n: infer_step(fn) for n, (fn, _) in live.items()}, s)
    if progress is not None:
        progress.update(f"{sh.name} M={sh.m} forward")
    t_tr = common.time_ops({n: train_step(fn, ps) for n, (fn, ps) in live.items()}, s)
    for name, (fn, params) in live.items():
        row = rows[name]
        is_lora = name != "base"
        ti, tt = t_inf[name], t_tr[name]
        train_once, infer_once = train_step(fn, params), infer_step(fn)
        fb = tt.ms["fwd_train"] + tt.ms["backward"]
        row.update(
            {
                "forward_ms": ti.ms["forward"],
                "fwd_train_ms": tt.ms["fwd_train"],
                "backward_ms": tt.ms["backward"],
                "fwd_bwd_ms": fb,
                "runs_forward": ti.runs,
                "runs_fwd_bwd": tt.runs,
                "spread_forward": ti.spread["forward"],
                "spread_fwd_bwd": max(tt.spread.values()),
                "peak_mem_train_MiB": common.peak_memory(functools.partial(train_once, _no_mark), dev) / common.MiB,
                "peak_mem_forward_MiB": common.peak_memory(functools.partial(infer_once, _no_mark), dev) / common.MiB,
            }
        )
        f_fwd, f_bwd = flops(sh, is_lora)
        row["tflops_forward"] = f_fwd / (ti.ms["forward"] * 1e9)
        row["tflops_fwd_bwd"] = (f_fwd + f_bwd) / (fb * 1e9)
        if peaks is not None:
            b_fwd, b_bwd = min_bytes(sh, elem, is_lora)
            peak_flops = peaks[s.dtype_name] * 1e12
            bw = peaks["tbps"] * 1e12
            roof_fwd = max(f_fwd / peak_flops, b_fwd / bw)
            roof_fb = max((f_fwd + f_bwd) / peak_flops, (b_fwd + b_bwd) / bw)
            row["roofline_frac_forward"] = roof_fwd / (ti.ms["forward"] * 1e-3)
            row["roofline_frac_fwd_bwd"] = roof_fb / (fb * 1e-3)
    if progress is not None:
        progress.update(f"{sh.name} M={sh.m} fwd+bwd")
    if "lora_ext[auto]" in rows:
        plan = lx.strategy_plan(sh.m, sh.n, sh.k, dt, device=dev)
        rows["lora_ext[auto]"]["plan"] = f"forward {plan.get('forward')}, backward {plan.get('backward')}"
    out = list(rows.values())
    add_ratios(out)
    return out


def _row_head(sh: Shape, s: Settings, method: str) -> dict[str, Any]:
    return {
        "bench": "lora_linear",
        "shape": sh.name,
        "M": sh.m,
        "K": sh.k,
        "N": sh.n,
        "r": sh.r,
        "dtype": s.dtype_name,
        "device": s.device,
        "method": method,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to the base of the same shape (same process) and to PEFT, in place."""
    by_shape: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_shape.setdefault((r["M"], r["K"], r["N"], r["r"]), {})[r["method"]] = r
    for methods in by_shape.values():
        base, peft = methods.get("base"), methods.get("peft")
        for r in methods.values():
            if base is not None and "forward_ms" in base and "forward_ms" in r:
                r["base_forward_ms"] = base["forward_ms"]
                r["base_fwd_bwd_ms"] = base["fwd_bwd_ms"]
                r["ratio_forward"] = r["forward_ms"] / base["forward_ms"]
                r["ratio_backward"] = r["backward_ms"] / base["backward_ms"]
                r["ratio_fwd_bwd"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                r["mem_over_base_MiB"] = r["peak_mem_train_MiB"] - base["peak_mem_train_MiB"]
            if peft is not None and "fwd_bwd_ms" in peft and "fwd_bwd_ms" in r:
                add_vs_peft(r, peft, base)


def add_vs_peft(r: dict[str, Any], peft: dict[str, Any], base: dict[str, Any] | None) -> None:
    """Ratios of ``r`` to the PEFT row, and the share of PEFT's overhead over ``base`` that ``r`` leaves."""
    r["vs_peft_forward"] = r["forward_ms"] / peft["forward_ms"]
    r["vs_peft_fwd_bwd"] = r["fwd_bwd_ms"] / peft["fwd_bwd_ms"]
    if base is not None and "fwd_bwd_ms" in base and peft["fwd_bwd_ms"] > base["fwd_bwd_ms"]:
        r["peft_overhead_share"] = (r["fwd_bwd_ms"] - base["fwd_bwd_ms"]) / (peft["fwd_bwd_ms"] - base["fwd_bwd_ms"])


def run_fallback_subprocess(shapes: list[Shape], s: Settings) -> list[dict[str, Any]]:
    """The fallback and its own base, measured by the runner in a child with LORA_EXT_DISABLE_EXTENSION=1."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--only",
            "lora_linear",
            "--methods",
            "base,fallback",
            "--device",
            s.device,
            "--dtype",
            s.dtype_name,
            "--threads",
            str(s.threads),
            "--shapes",
            ",".join(f"{sh.name}={sh.m}x{sh.k}x{sh.n}x{sh.r}" for sh in shapes),
            "--compile",
            "none",
            "--warmup",
            str(s.warmup),
            "--budget",
            str(s.budget_s),
            "--min-runs",
            str(s.min_runs),
            "--max-runs",
            str(s.max_runs),
            "--rotate",
            str(s.rotate),
            "--out",
            tmp,
        ]
        env = {**os.environ, "LORA_EXT_DISABLE_EXTENSION": "1", "TQDM_DISABLE": "1"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        out = os.path.join(tmp, "results.json")
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [
                {**_row_head(sh, s, "fallback"), "error": "fallback subprocess failed: " + " | ".join(tail)}
                for sh in shapes
            ]
        with open(out) as f:
            child = json.load(f)["rows"]
    return [r for r in child if r["method"] == "fallback"]


def run(shapes: list[Shape], s: Settings, methods: set[str], progress: common.Progress | None = None):
    """All rows for ``shapes``: in-process methods, then the fallback subprocess when the library is loaded."""
    lx = common.lora_ext()
    rows: list[dict[str, Any]] = []
    for sh in shapes:
        rows += bench_shape(sh, s, methods, progress)
    if "fallback" in methods and lx.extension_loaded():
        fb = run_fallback_subprocess(shapes, s)
        for r in fb:  # keep the child's base as the floor of its ratios, then compare with this process' PEFT
            peft = next(
                (
                    p
                    for p in rows
                    if p["method"] == "peft"
                    and (p["M"], p["K"], p["N"], p["r"]) == (r["M"], r["K"], r["N"], r["r"])
                    and "fwd_bwd_ms" in p
                ),
                None,
            )
            if peft is not None and "fwd_bwd_ms" in r:
                add_vs_peft(r, peft, {"fwd_bwd_ms": r["base_fwd_bwd_ms"]} if "base_fwd_bwd_ms" in r else None)
            r["note"] = "subprocess, LORA_EXT_DISABLE_EXTENSION=1; ratios to that process' base"
        rows += fb
        if progress is not None:
            progress.update("fallback (subprocess)")
    return rows


def jobs(shapes: list[Shape], s: Settings, methods: set[str]) -> int:
    """How many progress steps :func:`run` makes (for the progress bar total)."""
    return 2 * len(shapes) + int("fallback" in methods and common.lora_ext().extension_loaded())
