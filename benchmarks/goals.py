"""The performance goals (issue 13), in one table; report.py and the runner read them from here.

Each goal names the row it is measured on (bench, shape, dtype, the first method of
``methods`` present), the column it reads and the bound. :func:`evaluate` gives, for
every goal of a device, the measured value and met / not met / not measured.

Shares: ``share = (lora_ext - floor) / (PEFT - floor)``, the part of PEFT's overhead
over the floor (the frozen base without LoRA) that lora_ext leaves.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}
_SIGN = {"<=": "≤", "<": "<", ">=": "≥"}

LORA_EXT = ("lora_ext[auto]", "fallback")  # lora_linear rows: the default strategy (the fallback without library)
LORA_EXT_E2E = ("lora_ext", "lora_ext (fallback)")
LORA_EXT_MERGE = ("lora_ext", "fallback")


@dataclass(frozen=True)
class Goal:
    device: str  # "cpu" | "cuda": the runs it applies to
    text: str
    bench: str  # the rows' "bench" field
    match: dict[str, Any]  # further fields the row must have
    column: str  # the measured value
    op: str  # "<=", "<" or ">="
    target: float
    methods: Sequence[str] = field(default=LORA_EXT)

    @property
    def target_text(self) -> str:
        return f"{_SIGN[self.op]} {self.target:g}"


def _linear(m: int, k: int, dtype: str) -> dict[str, Any]:
    return {"M": m, "K": k, "N": k, "r": 16, "dtype": dtype}


_MERGE_CPU = [
    g
    for dt in ("fp32", "bf16")
    for g in (
        Goal(
            "cpu",
            f"merge_ {dt} 4096×4096 r=16: bandwidth ÷ copy of W",
            "merge",
            {"N": 4096, "K": 4096, "r": 16, "dtype": dt, "op": "merge"},
            "frac_of_copy_bw",
            ">=",
            0.80,
            LORA_EXT_MERGE,
        ),
        Goal(
            "cpu",
            f"merge_ {dt} 4096×4096 r=16: time ÷ addmm_",
            "merge",
            {"N": 4096, "K": 4096, "r": 16, "dtype": dt, "op": "merge"},
            "vs_addmm",
            "<",
            1.0,
            LORA_EXT_MERGE,
        ),
    )
]

GOALS: list[Goal] = [
    # ---- CPU (fp32, 2 threads)
    Goal(
        "cpu",
        "lora_linear fp32 M=8192 K=N=1024 r=16: fwd+bwd ÷ frozen base",
        "lora_linear",
        _linear(8192, 1024, "fp32"),
        "ratio_fwd_bwd",
        "<=",
        1.05,
    ),
    Goal(
        "cpu",
        "lora_linear fp32 M=1024 K=N=1024 r=16: share of PEFT's overhead left (fwd+bwd)",
        "lora_linear",
        _linear(1024, 1024, "fp32"),
        "peft_overhead_share",
        "<=",
        0.3,
    ),
    *(
        Goal(
            "cpu",
            f"per call fp32 M={m} K=N=512 r=16: lora_ext layer fwd+bwd ÷ PEFT layer",
            "percall",
            _linear(m, 512, "fp32"),
            "vs_peft",
            "<=",
            1.0,
            ("lora_ext_layer",),
        )
        for m in (1, 16)
    ),
    *_MERGE_CPU,
    Goal(
        "cpu",
        "e2e small Llama step (h=512, FFN 1376, 4 layers, 2×256 tokens): share of PEFT's overhead left",
        "e2e_step",
        {"model": "tiny-llama", "preset": "bench-cpu", "dtype": "fp32"},
        "peft_overhead_share",
        "<=",
        0.5,
        LORA_EXT_E2E,
    ),
    # ---- GPU (bf16)
    Goal(
        "cuda",
        "lora_linear bf16 M=8192 K=N=4096 r=16: forward ÷ frozen base",
        "lora_linear",
        _linear(8192, 4096, "bf16"),
        "ratio_forward",
        "<=",
        1.05,
    ),
    Goal(
        "cuda",
        "lora_linear bf16 M=8192 K=N=4096 r=16: fwd+bwd ÷ frozen base",
        "lora_linear",
        _linear(8192, 4096, "bf16"),
        "ratio_fwd_bwd",
        "<=",
        1.10,
    ),
    Goal(
        "cuda",
        "merge_ bf16 4096×4096 r=16: bandwidth ÷ copy of W",
        "merge",
        {"N": 4096, "K": 4096, "r": 16, "dtype": "bf16", "op": "merge"},
        "frac_of_copy_bw",
        ">=",
        0.85,
        LORA_EXT_MERGE,
    ),
    Goal(
        "cuda",
        "e2e Llama step (h=1024, 8 layers, 8×512 tokens): lora_ext step time ÷ PEFT",
        "e2e_step",
        {"model": "tiny-llama", "preset": "bench-gpu", "dtype": "bf16"},
        "vs_peft_step",
        "<",
        1.0,
        LORA_EXT_E2E,
    ),
    Goal(
        "cuda",
        "e2e Llama step: lora_ext peak memory ÷ PEFT",
        "e2e_step",
        {"model": "tiny-llama", "preset": "bench-gpu", "dtype": "bf16"},
        "vs_peft_mem",
        "<=",
        1.0,
        LORA_EXT_E2E,
    ),
]


def _row(goal: Goal, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    for method in goal.methods:
        for r in rows:
            if (
                r.get("bench") == goal.bench
                and r.get("method") == method
                and "error" not in r
                and all(r.get(k) == v for k, v in goal.match.items())
                and r.get(goal.column) is not None
            ):
                return r
    return None


def evaluate(rows: list[dict[str, Any]], device: str) -> list[list[Any]]:
    """[goal, method, measured, target, verdict] for every goal of ``device`` (verdict: met / NOT MET /
    not measured, the last when this run has no such row, e.g. in --quick mode)."""
    out = []
    for goal in GOALS:
        if goal.device != device:
            continue
        r = _row(goal, rows)
        if r is None:
            out.append([goal.text, None, None, goal.target_text, "not measured"])
            continue
        v = float(r[goal.column])
        out.append([goal.text, r["method"], v, goal.target_text, "met" if _OPS[goal.op](v, goal.target) else "NOT MET"])
    return out


HEADERS = ["goal", "method", "measured", "target", "verdict"]


def target(device: str, bench: str, column: str) -> float | None:
    """The bound of the first goal of ``device`` on ``bench``'s ``column`` (for the plots' dashed line)."""
    return next((g.target for g in GOALS if (g.device, g.bench, g.column) == (device, bench, column)), None)
