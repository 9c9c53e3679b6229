"""The benchmark harness: the one timer, peak memory, the environment collector, shapes, progress, output.

Every part (bench_lora_linear, bench_percall, bench_merge, bench_nf4, bench_e2e) times
with :func:`time_ops`, measures memory with :func:`peak_memory`, and its rows are
written by the runner (benchmarks/run.py) through :func:`write_csv` with the
:func:`metadata` of the run on every line; models and layers come from
benchmarks/fixtures.py, goals from benchmarks/goals.py.

Timing (:func:`time_ops`)
    ``warmup`` untimed calls, then timed calls until both ``min_runs`` calls and
    ``budget_s`` seconds per contender are reached (at most ``max_runs``); the
    figure is the median (with ``repeats`` > 1: the least of that many medians,
    for calls of a few µs; with ``inner`` > 1 a run is ``inner`` calls back to back
    and its time is their mean, so timer resolution does not matter). Contenders of one comparison run interleaved (one
    call each, in turn), so a busy spell on the machine hits all of them. Every call takes the next of several pre-built input sets
    (:class:`Rotating`), so no call reads inputs the previous one left in
    cache. On CUDA each call is bracketed by ``torch.cuda.Event``s and the L2
    cache is flushed (a 512 MiB buffer is zeroed, untimed) before each call, as
    Triton's ``do_bench`` does; on CPU ``time.perf_counter`` brackets the call
    (CPU ops are synchronous).

Peak memory (:func:`peak_memory`)
    Extra bytes allocated at the high-water mark of one call, above what was
    allocated before it (inputs and parameters are not counted; outputs,
    autograd-saved tensors, gradients and every temporary are).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU: every allocation and free that goes through c10's CPU allocator is
    recorded by PyTorch's autograd profiler (``profile_memory=True``), including those
    made inside compiled C++ kernels (``at::empty``); the running sum of the
    sizes in time order gives the high-water mark. Scratch memory that
    oneDNN/MKL take from ``malloc`` directly is not seen (the same for every
    method that calls the same BLAS).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MiB = 2**20


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    """How hard to measure: the runner picks these from --quick / the device."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    warmup: int = 1
    min_runs: int = 3
    max_runs: int = 50
    budget_s: float = 2.0
    rotate: int = 4
    quick: bool = False
    compile: str = "goal"  # none | goal | all: where torch.compile(PEFT layer) is measured
    threads: int = 0
    chunk_rows: tuple[int, ...] = ()  # CUDA: LORA_EXT_CUDA_CHUNK_ROWS values timed at the goal shape

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def lora_ext():
    """The lora_ext package, imported without its "no compiled library" warning (the report says it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        import lora_ext as lx
    return lx


# ---------------------------------------------------------------- timing


class Rotating:
    """Cycles through ``n`` pre-built items made by ``make()`` (so caches do not flatter anyone)."""

    def __init__(self, make: Callable[[], Any], n: int):
        self.items = [make() for _ in range(max(1, n))]
        self.i = -1

    def next(self) -> Any:
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


_L2_FLUSH: torch.Tensor | None = None


def _flush_cache(device: str) -> None:
    global _L2_FLUSH
    if device != "cuda":
        return
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(512 * MiB // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Milliseconds per phase (median over runs) and the number of runs."""

    ms: dict[str, float]
    runs: int
    spread: dict[str, float] = field(default_factory=dict)  # (p80 - p20) / median per phase


def _one_run(step: Callable[[Callable[[str], None]], None], dev: str, inner: int = 1) -> dict[str, float]:
    """Milliseconds per phase of ``step`` (mean over ``inner`` calls back to back)."""
    _flush_cache(dev)
    out: dict[str, float] = {}
    if dev == "cuda":
        events: list[tuple[str, torch.cuda.Event]] = []
        start = torch.cuda.Event(enable_timing=True)

        def mark(name: str) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append((name, ev))

        start.record()
        for _ in range(inner):
            step(mark)
        torch.cuda.synchronize()
        prev = start
        for name, ev in events:
            out[name] = out.get(name, 0.0) + prev.elapsed_time(ev) / inner
            prev = ev
        return out
    stamps: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        stamps.append((name, time.perf_counter()))

    t0 = time.perf_counter()
    for _ in range(inner):
        step(mark)
    prev = t0
    for name, t in stamps:
        out[name] = out.get(name, 0.0) + (t - prev) * 1e3 / inner
        prev = t
    return out


def _summarise(runs: list[dict[str, float]]) -> Timing:
    ms, spread = {}, {}
    for n in runs[0]:
        vals = sorted(r[n] for r in runs)
        med = statistics.median(vals)
        ms[n] = med
        lo, hi = vals[int(0.2 * (len(vals) - 1))], vals[math.ceil(0.8 * (len(vals) - 1))]
        spread[n] = (hi - lo) / med if med > 0 else 0.0
    return Timing(ms=ms, runs=len(runs), spread=spread)


def time_ops(
    steps: dict[str, Callable[[Callable[[str], None]], None]],
    s: Settings,
    warmup: int | None = None,
    inner: int = 1,
    repeats: int = 1,
) -> dict[str, Timing]:
    """Time several steps interleaved: round after round, each step runs once (in a rotating order).

    A step is called as ``step(mark)`` and calls ``mark(name)`` at the end of each
    of its phases; phase times are the differences between consecutive marks,
    starting from the call (a CUDA event per mark on the GPU). Interleaving
    makes a busy machine slow every contender alike instead of whichever ran
    during the busy spell. Rounds continue until each step has ``min_runs``
    runs and the rounds took ``budget_s`` per step (at most ``max_runs``).
    ``inner``: calls per run (their mean is the run's time); ``repeats``: that
    many such measurements, the least median of each phase is kept.
    """
    dev = s.device
    names = list(steps)
    for _ in range(s.warmup if warmup is None else warmup):
        for n in names:
            _one_run(steps[n], dev, inner)
    synchronize(dev)
    best: dict[str, Timing] = {}
    for _ in range(max(1, repeats)):
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        t_start = time.perf_counter()
        budget = s.budget_s * len(names)
        rnd = 0
        while rnd < s.max_runs and (rnd < s.min_runs or time.perf_counter() - t_start < budget):
            for j in range(len(names)):
                n = names[(j + rnd) % len(names)]
                runs[n].append(_one_run(steps[n], dev, inner))
            rnd += 1
        for n in names:
            t = _summarise(runs[n])
            if n not in best or sum(t.ms.values()) < sum(best[n].ms.values()):
                best[n] = t
    return best


def train_step(fn: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor], xs: Rotating, gs: Rotating):
    """A step for :func:`time_ops`: one training step of a layer on the next ``x`` (which requires grad):
    forward (phase ``fwd_train``), then ``torch.autograd.grad`` for x and ``params`` (phase ``backward``)."""

    def step(mark: Callable[[str], None]) -> None:
        x = xs.next()
        y = fn(x)
        mark("fwd_train")
        torch.autograd.grad(y, [x, *params], gs.next())
        mark("backward")

    return step


def randn(device: str, dtype: torch.dtype, seed: int = 0) -> Callable[..., torch.Tensor]:
    """``rnd(*size, std=1.0)``: seeded normal tensors on ``device`` in ``dtype`` (drawn there, then cast)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * std).to(dtype)

    return rnd


def time_op(step: Callable[[Callable[[str], None]], None], s: Settings) -> Timing:
    """:func:`time_ops` for a single step."""
    return time_ops({"op": step}, s)["op"]


# ---------------------------------------------------------------- memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler's kineto prints a line per start/stop)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(devnull)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    # The legacy autograd profiler records every c10 CPU allocation and free in
    # order and starts in milliseconds; kineto's profiler (the fallback here)
    # gives the same events but takes ~15 s to start on a CUDA build of torch
    # without a GPU.
    try:
        import torch.autograd.profiler_legacy as legacy

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = legacy.profile(profile_memory=True).config()
        legacy._enable_profiler_legacy(config)
    except Exception:  # noqa: BLE001  (private API gone: use kineto)
        return _cpu_peak_bytes_kineto(fn)
    try:
        out = fn()
        del out
    finally:
        records = legacy._disable_profiler_legacy()
    allocs = [r for thread in records for r in thread if r.kind() == "memory_alloc"]
    return _high_water((r.start_us(), r.cpu_memory_usage()) for r in allocs)


def _high_water(events: Iterable[tuple[float, int]]) -> int:
    """Peak of the running sum of (time, +bytes allocated / -bytes freed) events, in time order."""
    cur = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _cpu_peak_bytes_kineto(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = prof.profiler.kineto_results.events()
    return _high_water(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )


def peak_memory(fn: Callable[[], Any], device: str) -> int:
    """Extra bytes at the high-water mark of one call of ``fn`` (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        del out
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(fn)


# ---------------------------------------------------------------- metadata


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# What caps the CPU instruction set of a run on a CPU that has more: ATen's kernels and the fused
# lora_ext kernels follow ATEN_CPU_CAPABILITY (csrc/cpu/kernels/dispatch.cpp), MKL and oneDNN
# (the GEMMs of every contender) have their own switches. LORA_EXT_CPU_KERNEL picks the fused
# kernel variant alone.
CPU_ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
CPU_ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "LORA_EXT_CPU_KERNEL")


def rerun_with_cpu_isa(isa: str, module: str, argv: list[str]) -> None:
    """Re-execute ``python -m module argv`` with CPU_ISA_ENV[isa] set, unless it is set already.

    The switches are read once, when torch, MKL and oneDNN first look at the CPU, so they must be
    in the environment before the process starts; the new process replaces this one.
    """
    env = CPU_ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in env.items()):
        got = torch.backends.cpu.get_cpu_capability()
        if got != isa.upper():  # a CPU without the ISA (or not x86): the switches would change nothing
            raise SystemExit(f"--cpu-isa {isa}: this CPU runs torch at capability {got}, not {isa.upper()}")
        return
    os.environ.update(env)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def _cpu_isa_forced() -> str:
    return " ".join(f"{k}={os.environ[k]}" for k in CPU_ISA_VARS if os.environ.get(k))


def _cpu_kernel() -> str | None:
    with contextlib.suppress(Exception):
        from lora_ext.ops import _loader

        if _loader._C is not None:
            return _loader._C.cpu_kernel()
    return None


def _cpu_bf16_gemm() -> str | None:
    """Where the CPU's bf16 base GEMMs run: 'native' (torch's bf16 GEMM, AMX) or 'fp32' (widened chunks)."""
    with contextlib.suppress(Exception):
        from lora_ext.ops import _loader

        if _loader._C is not None and hasattr(_loader._C, "cpu_bf16_gemm"):
            return "native" if _loader._C.cpu_bf16_gemm()["native"] else "fp32"
    return None


def metadata(s: Settings) -> dict[str, Any]:
    """The environment of this run: machine, CPU capability, GPU, versions, lora_ext build, commit, date.

    Flat scalars only: every key becomes a column of every CSV row and a line of the report.
    """
    info = lora_ext().build_info()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    meta: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (commit + ("+dirty" if dirty else "")) if commit else "unknown",
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa_forced": _cpu_isa_forced(),
        "lora_ext_cpu_kernel": _cpu_kernel(),
        "lora_ext_cpu_bf16_gemm": _cpu_bf16_gemm(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": s.device,
        "device_name": torch.cuda.get_device_name(0) if s.device == "cuda" else _cpu_name(),
        "dtype": s.dtype_name,
        "lora_ext_compiled": info["extension_loaded"],
        "lora_ext_cuda_kernels": info.get("cuda"),
        "lora_ext_build": " ".join(
            f"{k}={info.get(k)}" for k in ("cuda_archs", "cuda_version", "compiler", "built_against_torch")
        ),
        "quick": s.quick,
    }
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_sm_count"] = props.multi_processor_count
        meta["driver"] = _nvidia_driver()
    for dist in ("peft", "transformers", "bitsandbytes"):  # installed versions, without importing them
        try:
            meta[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            meta[dist] = None
    return meta


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One LoRA linear problem: x [m, k], W [n, k], A [r, k], B [n, r]; ``name`` groups the M sweep."""

    name: str
    m: int
    k: int
    n: int
    r: int

    @property
    def key(self) -> str:
        return f"{self.name} M={self.m} K={self.k} N={self.n} r={self.r}"

    @property
    def group(self) -> str:
        return f"{self.name} (K={self.k}, N={self.n}, r={self.r})"


def _sweep(name: str, k: int, n: int, r: int, ms: Iterable[int]) -> list[Shape]:
    return [Shape(name, m, k, n, r) for m in ms]


GOAL_CPU = Shape("goal-cpu", 8192, 1024, 1024, 16)
GOAL_GPU = Shape("goal-gpu", 8192, 4096, 4096, 16)

PRESETS: dict[str, list[Shape]] = {
    # CI smoke: seconds
    "tiny": _sweep("tiny", 128, 128, 8, (64, 256)),
    "quick": _sweep("sq-256", 256, 256, 8, (64, 512)) + _sweep("mlp-384", 384, 1536, 8, (512,)),
    # CPU default: a few minutes on 2 cores; holds the CPU goal shape
    "cpu": (
        _sweep("goal-cpu", 1024, 1024, 16, (128, 1024, 8192))
        + _sweep("minilm-ffn", 384, 1536, 8, (128, 1024))
        + _sweep("vit-b-mlp", 768, 3072, 16, (197, 1576))
    ),
    # CPU rank sweep at the goal shape (not in the default run, for time)
    "cpu-ranks": [Shape(f"goal-cpu-r{r}", 8192, 1024, 1024, r) for r in (8, 64)],
    # GPU: the real-model shapes, M from decode to training sizes, ranks 8-128
    "gpu": (
        _sweep("llama7b-attn", 4096, 4096, 16, (1, 16, 512, 4096, 8192, 16384))
        + _sweep("llama7b-mlp-up", 4096, 11008, 16, (1, 16, 512, 4096, 8192, 16384))
        + _sweep("llama7b-mlp-down", 11008, 4096, 16, (1, 16, 512, 4096, 8192, 16384))
        + _sweep("llama8b-kv", 4096, 1024, 16, (1, 16, 4096, 16384))
        + _sweep("llama8b-mlp-up", 4096, 14336, 16, (1, 16, 4096, 16384))
        + _sweep("vit-b-mlp", 768, 3072, 16, (197, 1576, 12608))
        + [Shape(f"goal-gpu-r{r}", 8192, 4096, 4096, r) for r in (8, 64, 128)]
    ),
}
PRESETS["gpu-quick"] = (  # the GPU check's quick set (benchmarks/gpu_check.sh): goal shape, decode, a rank
    [GOAL_GPU, Shape("llama7b-attn", 16, 4096, 4096, 16), Shape("goal-gpu-r64", 8192, 4096, 4096, 64)]
)
PRESETS["cpu-goal"] = [GOAL_CPU]
PRESETS["gpu-goal"] = [GOAL_GPU]


def is_goal(sh: Shape) -> bool:
    """Whether ``sh`` has the dimensions of a goal shape (where torch.compile is measured by default)."""
    return any((sh.m, sh.k, sh.n, sh.r) == (g.m, g.k, g.n, g.r) for g in (GOAL_CPU, GOAL_GPU))


def parse_shapes(spec: str | None, device: str, quick: bool) -> list[Shape]:
    """``spec``: comma list of preset names and/or ``[name=]MxKxNxr`` items (e.g. ``cpu,4096x1024x1024x64``)."""
    if not spec:
        spec = ("gpu-quick" if device == "cuda" else "quick") if quick else ("gpu" if device == "cuda" else "cpu")
    shapes: list[Shape] = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        if item in PRESETS:
            shapes += PRESETS[item]
            continue
        name, _, dims = item.rpartition("=")
        parts = dims.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--shapes: expected a preset ({', '.join(PRESETS)}) or MxKxNxr, got {item!r}")
        m, k, n, r = map(int, parts)
        if min(m, k, n, r) <= 0:
            raise SystemExit(f"--shapes: sizes must be positive, got {item!r}")
        shapes.append(Shape(name or f"K{k}-N{n}-r{r}", m, k, n, r))
    seen, out = set(), []
    for sh in shapes:
        if (sh.m, sh.k, sh.n, sh.r) not in seen:
            seen.add((sh.m, sh.k, sh.n, sh.r))
            out.append(sh)
    return out


# ---------------------------------------------------------------- roofline

# Dense peak (TFLOP/s, no sparsity) and memory bandwidth (TB/s) of known GPUs; None -> no roofline column.
_GPU_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tbps": 4.8},
    "H100 80GB HBM3": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tbps": 3.35},
    "H100": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0, "tbps": 2.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tbps": 2.0},
}


def gpu_peaks(device_name: str) -> dict[str, float] | None:
    for key, val in _GPU_PEAKS.items():
        if key in device_name:
            return val
    return None


# ---------------------------------------------------------------- output


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal-ish stream, else one line per item."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        try:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=desc, unit="job", dynamic_ncols=True, leave=True, mininterval=0.5, file=sys.stderr
            )
        except ImportError:
            self.desc, self.total, self.done = desc, total, 0

    def update(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=False)
            self.bar.update(1)
        else:
            self.done += 1
            print(f"[{self.desc} {self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt(v: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (3 significant digits)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        mag = abs(v)
        if mag >= 1000:
            return f"{v:,.0f}"
        if mag < 1e-3:
            return f"{v:.2e}"
        return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(mag))))}f}"
    return str(v)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table for the terminal."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([line, sep, *body])


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_csv(path: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Rows plus the run's metadata columns (machine, device, versions, commit, date) on every line."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    meta_keys = [k for k in meta if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + meta_keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: meta[k] for k in meta_keys}, **r})


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
