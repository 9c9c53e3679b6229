"""Run the benchmark suite: LoRA linear, merge_/unmerge_, end to end; table, CSV, markdown report, plots.

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                             [--shapes PRESETS_OR_MxKxNxr] [--only lora_linear,merge,e2e] [--out DIR]

Defaults: the GPU when there is one (bf16, the issue's real-model shapes), else
the CPU (fp32, 2 threads, small shapes including the goal shape M=8192,
K=N=1024, r=16). ``--quick`` is the CI smoke run (about a minute on 2 cores).
Writes into --out (default bench_out/): lora_linear.csv, merge.csv, e2e.csv,
finetune_loss.csv (every row carries machine, device, versions, commit and
date), results.json, report.md and the PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from . import bench_e2e, bench_lora_linear, bench_merge, common, report  # noqa: E402
from .common import Settings  # noqa: E402

PARTS = ("lora_linear", "merge", "e2e")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny shapes, few runs, no torch.compile")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=tuple(common.DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--shapes", default=None, help=f"comma list of presets ({', '.join(common.PRESETS)}) and/or MxKxNxr items"
    )
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    p.add_argument(
        "--methods",
        default=",".join(bench_lora_linear.ALL_METHODS),
        help="LoRA linear contenders (base is always measured)",
    )
    p.add_argument(
        "--compile",
        choices=("none", "goal", "all"),
        default=None,
        help="shapes on which torch.compile(PEFT layer) is measured (default: goal; quick: none)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="CPU threads (default 2, as in the CPU goal; 0 = torch's default)"
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per contender and measurement")
    p.add_argument("--min-runs", type=int, default=None)
    p.add_argument("--out", default="bench_out")
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {PARTS}")
    a.parts = parts
    return a


def settings(a: argparse.Namespace) -> Settings:
    dtype = common.DTYPES[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    if a.quick:
        s = Settings(
            device=a.device,
            dtype=dtype,
            warmup=1,
            min_runs=3,
            max_runs=20,
            budget_s=0.1,
            rotate=2,
            quick=True,
            compile="none",
        )
    elif a.device == "cuda":
        s = Settings(
            device=a.device, dtype=dtype, warmup=3, min_runs=10, max_runs=200, budget_s=0.3, rotate=4, compile="goal"
        )
    else:
        s = Settings(
            device=a.device, dtype=dtype, warmup=1, min_runs=5, max_runs=50, budget_s=0.5, rotate=3, compile="goal"
        )
    if a.compile:
        s.compile = a.compile
    if a.budget is not None:
        s.budget_s = a.budget
    if a.min_runs is not None:
        s.min_runs = a.min_runs
    s.threads = a.threads if a.device == "cpu" else 0
    return s


def write_outputs(out: str, meta: dict, s: Settings, rows: list[dict], ft: dict, timings: dict) -> list[str]:
    """CSV per part, finetune_loss.csv, results.json, the plots and report.md; returns the plot names."""
    for part, benches in (
        ("lora_linear", ("lora_linear",)),
        ("merge", ("merge", "merge_drift")),
        ("e2e", ("e2e_step",)),
    ):
        part_rows = [r for r in rows if r.get("bench") in benches]
        if part_rows:
            common.write_csv(os.path.join(out, f"{part}.csv"), part_rows, meta)
    if ft.get("loss_curve"):
        common.write_csv(
            os.path.join(out, "finetune_loss.csv"),
            [{"bench": "finetune", "step": i + 1, "loss": v} for i, v in enumerate(ft["loss_curve"])],
            meta,
        )
    plots = []
    for name, fn, arg in (
        ("overhead.png", report.plot_overhead, rows),
        ("memory.png", report.plot_memory, rows),
        ("merge.png", report.plot_merge, rows),
        ("loss_curve.png", report.plot_loss, ft),
    ):
        if fn(arg, os.path.join(out, name)):
            plots.append(name)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "meta": meta,
                "settings": {k: str(v) for k, v in vars(s).items()},
                "timings_s": timings,
                "rows": rows,
                "finetune": ft,
            },
            f,
            indent=1,
            default=str,
        )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report.markdown(meta, rows, ft, plots, timings))
    return plots


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message="lora_ext: the compiled extension")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter of transformers/peft
    common.set_threads(a.threads if a.device == "cpu" else 0)
    s = settings(a)
    shapes = common.parse_shapes(a.shapes, a.device, a.quick)
    methods = set(a.methods.split(",")) | {"base"}
    os.makedirs(a.out, exist_ok=True)
    meta = common.metadata(s)
    print(
        f"lora_ext benchmark: {meta['device_name']} ({a.device}, {s.dtype_name}, torch {meta['torch']}, "
        f"threads {meta['torch_threads']}, lora_ext {'compiled' if meta['lora_ext_compiled'] else 'fallback'}, "
        f"commit {meta['commit']}) -> {a.out}/",
        flush=True,
    )

    total = 0
    if "lora_linear" in a.parts:
        total += bench_lora_linear.jobs(shapes, s, methods)
    if "merge" in a.parts:
        total += bench_merge.jobs(s)
    if "e2e" in a.parts:
        total += bench_e2e.jobs(s)
    prog = common.Progress(total, "bench")
    rows: list[dict] = []
    ft: dict = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for part in a.parts:  # files are rewritten after each part, so an interrupted run keeps what it measured
        t0 = time.perf_counter()
        if part == "lora_linear":
            rows += bench_lora_linear.run(shapes, s, methods, prog)
        elif part == "merge":
            rows += bench_merge.run(s, prog)
        else:
            rows += bench_e2e.run_steps(s, prog)
            write_outputs(a.out, meta, s, rows, ft, {**timings, part: time.perf_counter() - t0})
            ft = bench_e2e.finetune(s, prog)
        timings[part] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all
        plots = write_outputs(a.out, meta, s, rows, ft, timings)
    prog.close()

    # terminal
    for title, tbl in (
        ("LoRA linear", report.lora_linear_table),
        ("merge_/unmerge_", report.merge_table),
        ("bf16 drift", report.drift_table),
        ("end to end", report.e2e_table),
    ):
        headers, body = tbl(rows)
        if body:
            print(f"\n== {title}\n" + common.text_table(headers, body))
    if ft:
        print("\n== MiniLM fine-tune\n" + "\n".join(report.finetune_lines(ft)))
    g = report.goals(rows, meta)
    if g:
        print("\n== goals\n" + common.text_table(["goal", "measured", "target", "met"], g))
    print(f"\nwrote {a.out}/report.md, CSV and {len(plots)} plots in {timings['total']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
