"""Tables, goal checks, the markdown report and the PNG plots of a benchmark run."""

from __future__ import annotations

import os
import warnings
from typing import Any

from . import common

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
    headers = ["N", "K", "r", "dtype", "method", "op", "ms", "GB/s", "of copy bw", "peak extra MiB"]
    order = {"copy": 0, "lora_ext": 1, "fallback": 1, "peft": 2, "torch_addmm": 3}
    rows = sorted(rows, key=lambda r: (r["N"], r["K"], r["r"], order.get(r["method"], 9), r["op"]))
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


def e2e_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "model",
        "method",
        "tokens/step",
        "step ms",
        "fwd ms",
        "bwd ms",
        "optim ms",
        "×PEFT time",
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
                r.get("vs_peft_step"),
                r["peak_mem_MiB"],
                r.get("vs_peft_mem"),
                r["trainable_params"],
            ]
        )
    return headers, out


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


def goals(rows: list[Row], meta: dict[str, Any]) -> list[list[Any]]:
    """[goal, measured, target, met?] for every goal whose measurement is in ``rows``."""
    out: list[list[Any]] = []
    threads = meta.get("torch_threads")
    if meta.get("device") == "cpu" and meta.get("dtype") == "fp32":
        for method in ("lora_ext[auto]", "lora_ext[shrink_expand]", "lora_ext[merge]", "fallback"):
            r = _find(rows, bench="lora_linear", M=8192, K=1024, N=1024, r=16, method=method)
            if r is None:
                continue
            note = f" ({threads} threads)"
            v = r.get("ratio_fwd_bwd")
            out.append(
                [
                    f"CPU fp32 M=8192 K=N=1024 r=16: {method} fwd+bwd ÷ frozen base{note}",
                    v,
                    "≤ 1.10",
                    v is not None and v <= 1.10,
                ]
            )
            v = r.get("vs_peft_fwd_bwd")
            out.append(
                [
                    f"CPU fp32 M=8192 K=N=1024 r=16: {method} fwd+bwd ÷ PEFT{note}",
                    v,
                    "≤ 0.75",
                    v is not None and v <= 0.75,
                ]
            )
    if meta.get("device") == "cuda" and meta.get("dtype") == "bf16":
        for method in ("lora_ext[auto]", "lora_ext[shrink_expand]", "lora_ext[merge]"):
            r = _find(rows, bench="lora_linear", M=8192, K=4096, N=4096, r=16, method=method)
            if r is None:
                continue
            v = r.get("ratio_forward")
            out.append(
                [
                    f"GPU bf16 M=8192 K=N=4096 r=16: {method} forward ÷ frozen base",
                    v,
                    "≤ 1.05",
                    v is not None and v <= 1.05,
                ]
            )
            v = r.get("ratio_fwd_bwd")
            out.append(
                [
                    f"GPU bf16 M=8192 K=N=4096 r=16: {method} fwd+bwd ÷ frozen base",
                    v,
                    "≤ 1.10",
                    v is not None and v <= 1.10,
                ]
            )
        r = _find(rows, bench="merge", N=4096, K=4096, r=16, method="lora_ext", op="merge")
        if r is not None:
            v = r["frac_of_copy_bw"]
            out.append(["GPU bf16 4096×4096 r=16: merge_ bandwidth ÷ copy of W", v, "≥ 0.85", v >= 0.85])
    ext = next(
        (
            r
            for r in rows
            if r.get("bench") == "e2e_step"
            and r.get("model") == "tiny-llama"
            and r.get("status") == "ok"
            and r["method"].startswith("lora_ext")
        ),
        None,
    )
    peft = _find(rows, bench="e2e_step", model="tiny-llama", method="peft")
    if ext is not None and peft is not None:
        out.append(
            [
                "tiny Llama step, LoRA on all linear layers: lora_ext step time ÷ PEFT",
                ext["step_ms"] / peft["step_ms"],
                "< 1",
                ext["step_ms"] < peft["step_ms"],
            ]
        )
        out.append(
            [
                "tiny Llama step: lora_ext peak memory ÷ PEFT",
                ext["peak_mem_MiB"] / peft["peak_mem_MiB"],
                "≤ 1",
                ext["peak_mem_MiB"] <= peft["peak_mem_MiB"],
            ]
        )
    return out


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
            ax.axhline(1.10 if key == "ratio_fwd_bwd" else 1.05, color="gray", ls="--", lw=0.8)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    shapes = sorted({(r["N"], r["K"], r["r"]) for r in speed})
    bars = [("copy", "copy"), ("lora_ext", "merge"), ("fallback", "merge"), ("peft", "merge"), ("torch_addmm", "merge")]
    bars = [b for b in bars if any(r["method"] == b[0] for r in speed)]
    width = 0.8 / max(1, len(bars))
    for i, (mth, op) in enumerate(bars):
        vals = []
        for sh in shapes:
            r = _find(speed, N=sh[0], K=sh[1], r=sh[2], method=mth, op=op)
            vals.append(r["GB_per_s"] if r else 0)
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=mth if mth == "copy" else f"{mth} {op}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
    ax.set_xticklabels([f"{n}×{k}\nr={r}" for n, k, r in shapes], fontsize=8)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ markdown


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
            f"1-min load at start {meta['load_avg_1m']})",
        ],
        ["torch", f"{meta['torch']} (CUDA runtime {meta['cuda_runtime']})"],
        ["lora_ext", "compiled library" if meta["lora_ext_compiled"] else "pure-PyTorch fallback only"],
        ["peft / transformers", f"{meta['peft']} / {meta['transformers']}"],
        ["mode", "quick" if meta["quick"] else "full"],
        ["wall time", ", ".join(f"{k} {v:.0f} s" for k, v in sorted(timings.items(), key=lambda kv: kv[0] == "total"))],
    ]
    if meta.get("driver"):
        machine.insert(3, ["driver", meta["driver"]])
    lines += [common.md_table(["", ""], machine), ""]
    g = goals(rows, meta)
    if g:
        lines += ["## Goals", "", common.md_table(["goal", "measured", "target", "met"], g), ""]
    lines += [
        "## LoRA linear",
        "",
        "Median times; ratios divide by the frozen base `F.linear` of the same shape measured in the same "
        "process (the fallback: in its own subprocess, against that process' base). `fwd` is inference "
        "(no_grad); `fwd+bwd` a training step with grads for x, A, B. Peak memory: extra bytes at the "
        "high-water mark of one training step.",
        "",
        common.md_table(*lora_linear_table(rows)),
        "",
    ]
    if any(r.get("compile_s") for r in rows):
        lines += [
            "torch.compile time of the PEFT layer (first inference + training call): "
            + ", ".join(f"{r['shape']} M={r['M']}: {r['compile_s']:.1f} s" for r in rows if r.get("compile_s")),
            "",
        ]
    if any(r.get("bench") == "merge" for r in rows):
        lines += [
            "## merge_ / unmerge_",
            "",
            "In place on W; bandwidth = 2·N·K·elem / time; floor = `copy_` of W.",
            "",
            common.md_table(*merge_table(rows)),
            "",
            "bf16 drift after repeated merge + unmerge (W and factors bf16):",
            "",
            common.md_table(*drift_table(rows)),
            "",
        ]
    if any(r.get("bench") == "e2e_step" for r in rows):
        lines += [
            "## End to end: one training step (forward, backward, AdamW), LoRA r=16 α=32",
            "",
            common.md_table(*e2e_table(rows)),
            "",
        ]
    if ft:
        lines += ["## Real fine-tune: all-MiniLM-L6-v2 with lora_ext", "", *finetune_lines(ft), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    lines += ["How each figure is measured: BENCHMARKS.md and benchmarks/common.py.", ""]
    return "\n".join(lines)
