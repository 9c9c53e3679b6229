"""Tables, the goal table (from benchmarks/goals.py), the markdown report and the PNG plots of a benchmark run."""

from __future__ import annotations

import os
import warnings
from typing import Any

from . import bench_dora, common, goals

Row = dict[str, Any]

LORA_ORDER = [
    "base",
    "torch_unfused",
    "peft",
    "peft_compiled",
    "lora_ext[auto]",
    "lora_ext[shrink_expand]",
    "lora_ext[merge]",
    "fallback",
]


def _order(method: str) -> int:
    return LORA_ORDER.index(method) if method in LORA_ORDER else len(LORA_ORDER)


def _mib(v: Any) -> Any:
    return None if v is None else float(v)


# ------------------------------------------------------------------ tables


def lora_linear_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    rows = [r for r in rows if r.get("bench") == "lora_linear"]
    roof = any("roofline_frac_fwd_bwd" in r for r in rows)
    cuda = any(r.get("device") == "cuda" for r in rows)
    headers = [
        "shape",
        "M",
        "K",
        "N",
        "r",
        "method",
        "fwd ms",
        "fwd ×base",
        "fwd+bwd ms",
        "fwd+bwd ×base",
        "bwd ×base",
        "fwd+bwd ×PEFT",
        "share of PEFT overhead",
        "train peak MiB",
        "over base MiB",
    ]
    headers += ["TFLOP/s fwd+bwd" if cuda else "GFLOP/s fwd+bwd"]
    if roof:
        headers += ["roofline fwd", "roofline fwd+bwd"]
    out = []
    rows = sorted(rows, key=lambda r: (r["shape"], r["K"], r["N"], r["r"], r["M"], _order(r["method"])))
    for r in rows:
        if "error" in r:
            out.append(
                [r["shape"], r["M"], r["K"], r["N"], r["r"], r["method"], "error: " + r["error"][:60]]
                + [None] * (len(headers) - 7)
            )
            continue
        line = [
            r["shape"],
            r["M"],
            r["K"],
            r["N"],
            r["r"],
            r["method"],
            r.get("forward_ms"),
            r.get("ratio_forward"),
            r.get("fwd_bwd_ms"),
            r.get("ratio_fwd_bwd"),
            r.get("ratio_backward"),
            r.get("vs_peft_fwd_bwd"),
            r.get("peft_overhead_share"),
            _mib(r.get("peak_mem_train_MiB")),
            _mib(r.get("mem_over_base_MiB")),
        ]
        tf = r.get("tflops_fwd_bwd")
        line.append(None if tf is None else (tf if cuda else tf * 1e3))
        if roof:
            line += [r.get("roofline_frac_forward"), r.get("roofline_frac_fwd_bwd")]
        out.append(line)
    return headers, out


def merge_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    rows = [r for r in rows if r.get("bench") == "merge"]
    headers = ["N", "K", "r", "dtype", "method", "op", "ms", "GB/s", "of copy bw", "×addmm_", "peak extra MiB"]
    order = {"copy": 0, "lora_ext": 1, "fallback": 1, "lora_ext_exact": 1.5, "fallback_exact": 1.5, "peft": 2}
    order["torch_addmm"] = 3
    rows = sorted(rows, key=lambda r: (r["N"], r["K"], r["r"], r["dtype"], order.get(r["method"], 9), r["op"]))
    return headers, [
        [
            r["N"],
            r["K"],
            r["r"],
            r["dtype"],
            r["method"],
            r["op"],
            r["ms"],
            r["GB_per_s"],
            r["frac_of_copy_bw"],
            r.get("vs_addmm"),
            r["peak_mem_MiB"],
        ]
        for r in rows
    ]


def drift_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    rows = [r for r in rows if r.get("bench") == "merge_drift"]
    headers = ["N×K (r)", "method", "cycles", "max|ΔW| / max|W|", "‖ΔW‖ / ‖W‖", "elements changed"]
    return headers, [
        [
            f"{r['N']}×{r['K']} ({r['r']})",
            r["method"],
            r["cycles"],
            r["max_abs_over_max_w"],
            r["rel_fro"],
            r["frac_changed"],
        ]
        for r in rows
    ]


def record_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    rows = [r for r in rows if r.get("bench") == "merge_record"]
    headers = ["N×K (r)", "dtype", "|ΔW| / |W|", "elements recorded", "record bytes", "÷ W's bytes"]
    return headers, [
        [
            f"{r['N']}×{r['K']} ({r['r']})",
            r["dtype"],
            r["ratio"],
            r["elements_recorded"],
            r["record_bytes"],
            r["record_frac"],
        ]
        for r in rows
    ]


def e2e_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "model",
        "method",
        "tokens/step",
        "step ms",
        "fwd ms",
        "bwd ms",
        "optim ms",
        "over floor ms",
        "×PEFT time",
        "share of PEFT overhead",
        "peak MiB",
        "×PEFT mem",
        "trainable",
    ]
    out = []
    for r in rows:
        if r.get("bench") != "e2e_step":
            continue
        if r.get("status") != "ok":
            out.append([r["model"], "skipped: " + r.get("reason", "")[:90]] + [None] * (len(headers) - 2))
            continue
        out.append(
            [
                r["model"],
                r["method"],
                r["batch"] * r["seq"],
                r["step_ms"],
                r["forward_ms"],
                r["backward_ms"],
                r["optimizer_ms"],
                r.get("over_floor_ms"),
                r.get("vs_peft_step"),
                r.get("peft_overhead_share"),
                r["peak_mem_MiB"],
                r.get("vs_peft_mem"),
                r["trainable_params"],
            ]
        )
    return headers, out


def percall_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    headers = ["M", "K", "N", "r", "method", "fwd+bwd µs", "over F.linear µs", "×PEFT", "share of PEFT overhead"]
    rows = [r for r in rows if r.get("bench") == "percall"]
    return headers, [
        [
            r["M"],
            r["K"],
            r["N"],
            r["r"],
            r["method"],
            r["fwd_bwd_us"],
            r["over_floor_us"],
            r.get("vs_peft"),
            r.get("peft_overhead_share"),
        ]  # fmt: skip
        for r in rows
    ]


def nf4_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    headers = ["M", "K", "N", "r", "dtype", "method", "fwd+bwd ms", "×base", "×bnb+peft"]
    out = []
    for r in rows:
        if r.get("bench") != "nf4":
            continue
        if "error" in r:
            out.append(
                [r["M"], r["K"], r["N"], r["r"], r["dtype"], r["method"], "skipped: " + r["error"][:80], None, None]
            )
            continue
        out.append([r["M"], r["K"], r["N"], r["r"], r["dtype"], r["method"], r["fwd_bwd_ms"], r["ratio_fwd_bwd"],
                    r.get("vs_bnb_peft")])  # fmt: skip
    return headers, out


def nf4_bits_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    headers = ["NF4 weight", "blocksize", "double quant", "bits / parameter"]
    rows = [r for r in rows if r.get("bench") == "nf4_bits"]
    return headers, [[r["layer"], r["blocksize"], r["double_quant"], r["bits_per_param"]] for r in rows]


def mixed_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    rows = [r for r in rows if r.get("bench") == "mixed"]
    headers = ["M (rows)", "K", "N", "r", "adapters", "dtype", "method", "op", "ms", "×dense", "×PEFT"]
    order = {"base": 0, "dense": 1, "lora_ext": 2, "lora_ext[fallback]": 2, "peft": 3}
    rows = sorted(rows, key=lambda r: (r["n_adapters"], r["op"], order.get(r["method"], 9)))
    return headers, [
        [
            f"{r['M']} ({r['rows']})",
            r["K"],
            r["N"],
            r["r"],
            r["n_adapters"],
            r["dtype"],
            r["method"],
            r["op"],
            r["ms"],
            r["vs_dense"],
            r["vs_peft"],
        ]  # fmt: skip
        for r in rows
    ]


TABLES = (  # (title, table function): the terminal output and the report, in this order
    ("LoRA linear", lora_linear_table),
    ("per-call overhead (one layer, fwd+bwd)", percall_table),
    ("merge_/unmerge_", merge_table),
    ("bf16 drift", drift_table),
    ("exact merge record size", record_table),
    ("QLoRA (NF4) layer", nf4_table),
    ("NF4 storage", nf4_bits_table),
    ("mixed-adapter batches (one adapter per row)", mixed_table),
    ("DoRA layer (fwd+bwd)", bench_dora.table),
    ("end to end", e2e_table),
)


def finetune_lines(ft: dict[str, Any]) -> list[str]:
    if not ft:
        return ["(not run)"]
    if ft.get("status") != "ok":
        return [f"skipped: {ft.get('reason')}"]
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    return [
        f"- task: {ft['task']}; {ft['n_train']} training / {ft['n_test']} test sentences (test nouns and "
        f"templates unseen in training); {ft['steps']} steps of batch {ft['batch']}",
        f"- LoRA r=8, alpha=16, dropout 0.1 on query/key/value/dense + trained head: "
        f"{ft['trainable_params']:,} of {ft['total_params']:,} parameters train",
        f"- accuracy before: zero-shot {pct(ft['acc_zero_shot'])}; linear probe (frozen encoder, same steps) "
        f"{pct(ft['acc_linear_probe'])}; untrained head {pct(ft['acc_before_lora'])}",
        f"- accuracy after the LoRA fine-tune: **{pct(ft['acc_after'])}** on test "
        f"({pct(ft['train_acc_after'])} on training sentences)",
        f"- loss: {ft['loss_first10']:.3f} (mean of the first 10 steps) → {ft['loss_last10']:.3f} (last 10); "
        f"{ft['train_s']:.1f} s of training",
        f"- merge_and_unload: largest logit difference merged vs unmerged {ft['merged_max_abs_logit_diff']:.2e} "
        f"(relative {ft['merged_max_rel_logit_diff']:.2e}); same predictions: "
        f"{'yes' if ft['merged_same_predictions'] else 'NO'}; merged accuracy {pct(ft['merged_acc'])}; "
        f"plain modules after unload: {'yes' if ft['merged_plain_modules'] else 'no'}",
    ]


# ------------------------------------------------------------------ goals


def _find(rows: list[Row], **kw) -> Row | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and "error" not in r:
            return r
    return None


def goal_table(rows: list[Row], meta: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Every goal of this run's device (benchmarks/goals.py): measured value and met / NOT MET / not measured."""
    return goals.HEADERS, goals.evaluate(rows, meta.get("device", "cpu"))


# ------------------------------------------------------------------ plots


_PLOTS_UNAVAILABLE: str | None = None  # why matplotlib could not be imported (warned about once)


def _plt() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing.

    Plots are optional: without matplotlib the CSV, JSON and markdown are still written and
    one RuntimeWarning per process says the plots were skipped.
    """
    global _PLOTS_UNAVAILABLE
    if _PLOTS_UNAVAILABLE is not None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        _PLOTS_UNAVAILABLE = str(exc) or type(exc).__name__
        warnings.warn(
            f"benchmarks: matplotlib is not importable ({_PLOTS_UNAVAILABLE}); skipping the plots "
            "(CSV, JSON and report.md are still written)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return plt


def _save(plt: Any, fig: Any, path: str) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_overhead(rows: list[Row], path: str) -> bool:
    rows = [r for r in rows if r.get("bench") == "lora_linear" and "ratio_fwd_bwd" in r]
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(f"{r['shape']}\nK={r['K']} N={r['N']} r={r['r']}", []).append(r)
    if not groups:
        return False
    plt = _plt()
    if plt is None:
        return False
    ncol = len(groups)
    fig, axes = plt.subplots(2, ncol, figsize=(max(5.0, 4.2 * ncol), 7.5), squeeze=False)
    methods = sorted({r["method"] for r in rows if r["method"] != "base"}, key=_order)
    for j, (title, rs) in enumerate(groups.items()):
        for i, (key, label) in enumerate((("ratio_forward", "forward ÷ base"), ("ratio_fwd_bwd", "fwd+bwd ÷ base"))):
            ax = axes[i][j]
            for mth in methods:
                pts = sorted((r["M"], r[key]) for r in rs if r["method"] == mth and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mth)
            ax.axhline(1.0, color="black", lw=0.8)
            goal = goals.target(rs[0].get("device", "cpu"), "lora_linear", key)
            if goal is not None:
                ax.axhline(goal, color="gray", ls="--", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens M")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    for ax in axes.flat:
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 20:
            ax.set_yscale("log")
    fig.suptitle("LoRA linear time ÷ frozen base linear\n(1.0 = free; dashed = goal)", fontsize=9)
    return _save(plt, fig, path)


def plot_memory(rows: list[Row], path: str) -> bool:
    rows = [r for r in rows if r.get("bench") == "lora_linear" and "peak_mem_train_MiB" in r]
    if not rows:
        return False
    largest: dict[tuple, int] = {}
    for r in rows:
        key = (r["shape"], r["K"], r["N"], r["r"])
        largest[key] = max(largest.get(key, 0), r["M"])
    keys = list(largest)
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(keys)), 4.5))
    methods = sorted({r["method"] for r in rows}, key=_order)
    width = 0.8 / len(methods)
    for i, mth in enumerate(methods):
        vals = []
        for key in keys:
            r = _find(rows, shape=key[0], K=key[1], N=key[2], r=key[3], M=largest[key], method=mth)
            vals.append(r["peak_mem_train_MiB"] if r else 0)
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=mth)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([f"{k[0]}\nM={largest[k]} K={k[1]}\nN={k[2]} r={k[3]}" for k in keys], fontsize=7)
    ax.set_ylabel("peak extra MiB, one training step")
    ax.set_title("Peak memory of one layer's training step (inputs and weights excluded)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_merge(rows: list[Row], path: str) -> bool:
    speed = [r for r in rows if r.get("bench") == "merge"]
    drift = [r for r in rows if r.get("bench") == "merge_drift"]
    if not speed and not drift:
        return False
    plt = _plt()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    shapes = sorted({(r["N"], r["K"], r["r"], r["dtype"]) for r in speed})
    bars = [("copy", "copy"), ("lora_ext", "merge"), ("fallback", "merge"), ("peft", "merge"), ("torch_addmm", "merge")]
    bars = [b for b in bars if any(r["method"] == b[0] for r in speed)]
    width = 0.8 / max(1, len(bars))
    for i, (mth, op) in enumerate(bars):
        vals = []
        for sh in shapes:
            r = _find(speed, N=sh[0], K=sh[1], r=sh[2], dtype=sh[3], method=mth, op=op)
            vals.append(r["GB_per_s"] if r else 0)
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=mth if mth == "copy" else f"{mth} {op}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
    ax.set_xticklabels([f"{n}×{k}\nr={r} {dt}" for n, k, r, dt in shapes], fontsize=8)
    ax.set_ylabel("GB/s (2·N·K·elem / time)")
    ax.set_title("merge bandwidth (copy of W = floor)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    for mth in sorted({r["method"] for r in drift}):
        pts = sorted((r["cycles"], r["rel_fro"]) for r in drift if r["method"] == mth)
        ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="o", label=mth)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("merge + unmerge cycles (bf16 W)")
    ax.set_ylabel("‖W − W₀‖ / ‖W₀‖ (1e-12 = exact)")
    ax.set_title("bf16 drift", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_loss(ft: dict[str, Any], path: str) -> bool:
    curve = ft.get("loss_curve") if ft else None
    if not curve:
        return False
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(curve) + 1), curve, lw=0.8, alpha=0.5, label="loss per step")
    w = 10
    if len(curve) >= w:
        avg = [sum(curve[i - w + 1 : i + 1]) / w for i in range(w - 1, len(curve))]
        ax.plot(range(w, len(curve) + 1), avg, lw=1.8, label=f"mean of last {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(
        f"all-MiniLM-L6-v2 + lora_ext LoRA: accuracy {100 * ft['acc_zero_shot']:.0f} % (zero-shot) → "
        f"{100 * ft['acc_after']:.0f} %",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


# ------------------------------------------------------------------ markdown


SECTIONS = (  # the report's sections: (title, paragraphs and table functions); a section without rows is left out
    (
        "LoRA linear",
        [
            "Median times; ratios divide by the frozen base `F.linear` of the same shape measured in the same "
            "process (the fallback: in its own subprocess, against that process' base). `fwd` is inference "
            "(no_grad); `fwd+bwd` a training step with grads for x, A, B; share = (method − base) / (PEFT − base), "
            "fwd+bwd. Peak memory: extra bytes at the high-water mark of one training step.",
            lora_linear_table,
        ],
    ),
    (
        "Per-call overhead: one layer, K=N=512, r=16, fwd+bwd",
        [
            "µs per call: least of several medians of runs of many calls back to back; the floor is "
            "`F.linear` (frozen W, x requires grad); share = (method − floor) / (PEFT − floor).",
            percall_table,
        ],
    ),
    (
        "merge_ / unmerge_",
        [
            "In place on W; bandwidth = 2·N·K·elem / time; floor = `copy_` of W.",
            merge_table,
            "bf16 drift after repeated merge + unmerge (W and factors bf16):",
            drift_table,
            "Exact merge: record size (positions + original values of the elements unmerge would not restore):",
            record_table,
        ],
    ),
    ("QLoRA: NF4 layer against bitsandbytes Linear4bit + PEFT's LoRA branch", [nf4_table, nf4_bits_table]),
    (
        "End to end: one training step (forward, backward, AdamW), LoRA r=16 α=32",
        [
            "The floor is the same frozen model without LoRA, its target layers' outputs requiring grad "
            "(the same activation gradients as with LoRA); share = (method − floor) / (PEFT − floor).",
            e2e_table,
        ],
    ),
)


def markdown(
    meta: dict[str, Any], rows: list[Row], ft: dict[str, Any], plots: list[str], timings: dict[str, float]
) -> str:
    lines = [f"# lora_ext benchmark — {meta['device_name']} ({meta['device']}, {meta['dtype']})", ""]
    machine = [
        ["date", meta["date_utc"]],
        ["commit", meta["commit"]],
        ["device", meta["device_name"]],
        [
            "CPU",
            f"{meta['cpu']} ({meta['cpu_cores']} cores, torch threads {meta['torch_threads']}, "
            f"capability {meta.get('cpu_capability')}"
            + (f", forced by {meta['cpu_isa_forced']}" if meta.get("cpu_isa_forced") else "")
            + f", lora_ext CPU kernels {meta.get('lora_ext_cpu_kernel')}, bf16 GEMMs {meta.get('lora_ext_cpu_bf16_gemm')}"
            + f", 1-min load at start {meta['load_avg_1m']})",
        ],
        ["torch", f"{meta['torch']} (CUDA runtime {meta['cuda_runtime']})"],
        [
            "lora_ext",
            ("compiled library" if meta["lora_ext_compiled"] else "pure-PyTorch fallback only")
            + f" ({meta.get('lora_ext_build')})",
        ],
        ["peft / transformers / bitsandbytes", f"{meta['peft']} / {meta['transformers']} / {meta.get('bitsandbytes')}"],
        ["mode", "quick" if meta["quick"] else "full"],
        ["wall time", ", ".join(f"{k} {v:.0f} s" for k, v in sorted(timings.items(), key=lambda kv: kv[0] == "total"))],
    ]
    if meta.get("driver"):
        machine.insert(
            3, ["GPU", f"driver {meta['driver']}, {meta.get('gpu_memory_gib')} GiB, {meta.get('gpu_sm_count')} SMs"]
        )
    lines += [common.md_table(["", ""], machine), ""]
    lines += ["## Goals", "", common.md_table(*goal_table(rows, meta)), ""]
    for title, items in SECTIONS:
        tables = [common.md_table(*tbl(rows)) if callable(tbl) and tbl(rows)[1] else None for tbl in items]
        if not any(tables):
            continue
        lines += [f"## {title}", ""]
        for item, table in zip(items, tables):
            if not callable(item):
                lines += [item, ""]
            elif table:
                lines += [table, ""]
        if title == "LoRA linear" and any(r.get("compile_s") for r in rows):
            lines += [
                "torch.compile time of the PEFT layer (first inference + training call): "
                + ", ".join(f"{r['shape']} M={r['M']}: {r['compile_s']:.1f} s" for r in rows if r.get("compile_s")),
                "",
            ]
    if ft:
        lines += ["## Real fine-tune: all-MiniLM-L6-v2 with lora_ext", "", *finetune_lines(ft), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    lines += ["How each figure is measured: BENCHMARKS.md and benchmarks/common.py.", ""]
    return "\n".join(lines)
