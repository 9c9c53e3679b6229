"""Run the benchmark suite: LoRA linear, per-call overhead, merge_/unmerge_, QLoRA (NF4), end to end.

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                             [--shapes PRESETS_OR_MxKxNxr] [--only lora_linear,percall,merge,nf4,mixed,dora,e2e] [--out DIR]

Defaults: the GPU when there is one (bf16, the issue's real-model shapes), else
the CPU (fp32, 2 threads, small shapes including the goal shape M=8192,
K=N=1024, r=16). ``--device cuda`` runs every part on the GPU (the GPU shapes,
merge sizes and Llama preset); ``--device cuda --quick`` is the GPU check's set
(benchmarks/gpu_check.sh: the goal shape, a decode shape, r=64; well under a minute
on an H200). ``--quick`` on the CPU is the CI smoke run (under a minute on 2 cores).
Writes into --out (default bench_out/): one CSV per part (lora_linear, percall,
merge, nf4, mixed, dora, e2e) and finetune_loss.csv, every row carrying the run's environment
(benchmarks/common.py: metadata), results.json, report.md (with the goal table of
benchmarks/goals.py) and the PNG plots (skipped with one warning without matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from . import (  # noqa: E402
    bench_dora,
    bench_e2e,
    bench_lora_linear,
    bench_merge,
    bench_mixed,
    bench_nf4,
    bench_percall,
    common,
    report,
)
from .common import Settings  # noqa: E402

PARTS = ("lora_linear", "percall", "merge", "nf4", "mixed", "dora", "e2e")
CSV_FILES = {  # output file -> the "bench" values of its rows
    "lora_linear": ("lora_linear",),
    "percall": ("percall",),
    "merge": ("merge", "merge_drift", "merge_record"),
    "nf4": ("nf4", "nf4_bits"),
    "mixed": ("mixed",),
    "dora": ("dora",),
    "e2e": ("e2e_step",),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny shapes, few runs, no torch.compile")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=tuple(common.DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--shapes",
        default=None,
        help=f"lora_linear shapes: comma list of presets ({', '.join(common.PRESETS)}) and/or [name=]MxKxNxr items",
    )
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    p.add_argument(
        "--methods",
        default=None,
        help=f"LoRA linear contenders, base always measured (default: {','.join(bench_lora_linear.ALL_METHODS)}; "
        "the fallback is left out of the quick GPU run)",
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
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--min-runs", type=int, default=None)
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--rotate", type=int, default=None, help="input sets cycled through")
    p.add_argument(
        "--chunk-rows",
        default=None,
        help="CUDA: comma list of LORA_EXT_CUDA_CHUNK_ROWS values timed at the goal shape (default: 512,2048,8192; "
        "quick: none)",
    )
    p.add_argument(
        "--cpu-isa",
        choices=("native", *common.CPU_ISA_ENV),
        default="native",
        help="cap the CPU instruction set of torch, MKL, oneDNN and lora_ext's kernels (the run re-executes "
        "itself with the switches of benchmarks/common.py: CPU_ISA_ENV); default: what the CPU has",
    )
    p.add_argument("--out", default="bench_out")
    a = p.parse_args(argv)
    if a.cpu_isa != "native":
        common.rerun_with_cpu_isa(a.cpu_isa, "benchmarks.run", list(sys.argv[1:] if argv is None else argv))
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {PARTS}")
    a.parts = parts
    if a.methods is None:
        quick_gpu = a.quick and a.device == "cuda"
        a.methods = ",".join(m for m in bench_lora_linear.ALL_METHODS if not (quick_gpu and m == "fallback"))
    return a


# How hard to measure: (warmup, min_runs, max_runs, budget_s per contender, rotating input sets, compile)
PROFILES = {
    "quick": (1, 3, 20, 0.1, 2, "none"),
    "cuda": (3, 10, 200, 0.3, 4, "goal"),
    "cpu": (1, 5, 50, 0.5, 3, "goal"),
}


def settings(a: argparse.Namespace) -> Settings:
    dtype = common.DTYPES[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    warmup, min_runs, max_runs, budget_s, rotate, compile_ = PROFILES["quick" if a.quick else a.device]
    s = Settings(a.device, dtype, warmup, min_runs, max_runs, budget_s, rotate, a.quick, compile_)
    if a.compile:
        s.compile = a.compile
    for opt, field in (("budget", "budget_s"), ("warmup", "warmup"), ("min_runs", "min_runs")):
        if getattr(a, opt) is not None:
            setattr(s, field, getattr(a, opt))
    for opt in ("max_runs", "rotate"):
        if getattr(a, opt) is not None:
            setattr(s, opt, getattr(a, opt))
    if a.device == "cuda":
        spec = a.chunk_rows if a.chunk_rows is not None else ("" if a.quick else "512,2048,8192")
        s.chunk_rows = tuple(int(c) for c in spec.split(",") if c.strip())
    s.threads = a.threads if a.device == "cpu" else 0
    return s


def write_outputs(out: str, meta: dict, s: Settings, rows: list[dict], ft: dict, timings: dict) -> list[str]:
    """CSV per part, finetune_loss.csv, results.json, the plots and report.md; returns the plot names."""
    for part, benches in CSV_FILES.items():
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

    simple = {
        "percall": bench_percall,
        "merge": bench_merge,
        "nf4": bench_nf4,
        "mixed": bench_mixed,
        "dora": bench_dora,
    }  # parts with run(s, progress)
    total = sum(simple[p].jobs(s) for p in a.parts if p in simple)
    if "lora_linear" in a.parts:
        total += bench_lora_linear.jobs(shapes, s, methods)
    if "e2e" in a.parts:
        total += bench_e2e.jobs(s)
    prog = common.Progress(total, "bench")
    rows: list[dict] = []
    ft: dict = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    failed: list[str] = []
    for part in a.parts:  # files are rewritten after each part, so an interrupted run keeps what it measured
        t0 = time.perf_counter()
        try:
            if part == "lora_linear":
                rows += bench_lora_linear.run(shapes, s, methods, prog)
            elif part in simple:
                rows += simple[part].run(s, prog)
            else:
                rows += bench_e2e.run_steps(s, prog)
                write_outputs(a.out, meta, s, rows, ft, {**timings, part: time.perf_counter() - t0})
                ft = bench_e2e.finetune(s, prog)
        except Exception as exc:  # noqa: BLE001  (a broken part must not cost the others' results; exit 1 below)
            traceback.print_exc()
            failed.append(f"{part}: {type(exc).__name__}: {str(exc)[:200]}")
        timings[part] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all
        plots = write_outputs(a.out, meta, s, rows, ft, timings)
    prog.close()

    # terminal
    for title, tbl in report.TABLES:
        headers, body = tbl(rows)
        if body:
            print(f"\n== {title}\n" + common.text_table(headers, body))
    if ft:
        print("\n== MiniLM fine-tune\n" + "\n".join(report.finetune_lines(ft)))
    print("\n== goals\n" + common.text_table(*report.goal_table(rows, meta)))
    print(f"\nwrote {a.out}/report.md, CSV and {len(plots)} plots in {timings['total']:.0f} s", flush=True)
    for line in failed:
        print(f"FAILED part {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
