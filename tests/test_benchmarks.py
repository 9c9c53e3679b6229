"""Smoke test of the benchmark suite: the runner in quick mode on a tiny shape set, into a tmp dir.

Checks that the CSVs (every part's, each row with the run's environment), the goal
table, the markdown report and the PNG plots exist and parse, not the figures
themselves (timings on a shared CI machine mean nothing).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

import lora_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--shapes",
        "tiny",
        "--device",
        "cpu",
        "--methods",
        "base,torch_unfused,peft,lora_ext,fallback",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lora_linear_csv(quick_run):
    out, _ = quick_run
    rows = _csv(out / "lora_linear.csv")
    methods = {r["method"] for r in rows}
    assert {"base", "torch_unfused", "fallback"} <= methods
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    for r in rows:
        assert float(r["fwd_bwd_ms"]) > 0 and float(r["forward_ms"]) > 0
        assert float(r["max_rel_err"]) < 1e-4, r  # every contender computes the same function
        # machine, CPU capability, versions, build, commit and date on every line
        for key in ("date_utc", "torch", "device", "commit", "cpu", "cpu_capability", "lora_ext_build"):
            assert r[key], key
    base = [r for r in rows if r["method"] == "base"]
    assert base and all(abs(float(r["ratio_fwd_bwd"]) - 1.0) < 1e-9 for r in base)


def test_merge_and_e2e_csv(quick_run):
    out, _ = quick_run
    merge = _csv(out / "merge.csv")
    assert {r["bench"] for r in merge} == {"merge", "merge_drift", "merge_record"}
    assert any(r["method"].endswith("_exact") for r in merge if r["bench"] == "merge")
    assert all(float(r["record_frac"]) > 0 for r in merge if r["bench"] == "merge_record")
    assert any(r["method"] == "copy" for r in merge)
    assert all(float(r["GB_per_s"]) > 0 for r in merge if r["bench"] == "merge")
    assert all(r["cpu_capability"] for r in merge)
    e2e = _csv(out / "e2e.csv")
    assert {r["model"] for r in e2e} == {"tiny-llama", "all-MiniLM-L6-v2"}
    for r in e2e:
        if r["status"] == "ok":
            assert float(r["step_ms"]) > 0 and float(r["peak_mem_MiB"]) > 0
            assert float(r["floor_step_ms"]) > 0 and r["peft_overhead_share"]
        else:
            assert r["reason"]
    ok = [r for r in e2e if r["status"] == "ok" and r["model"] == "tiny-llama"]
    if ok:  # the floor: same model, frozen, no LoRA, still a backward
        floor = next(r for r in ok if r["method"].startswith("floor"))
        assert int(floor["trainable_params"]) == 0 and float(floor["backward_ms"]) > 0
        assert float(floor["over_floor_ms"]) == 0


def test_percall_and_nf4_csv(quick_run):
    out, _ = quick_run
    percall = _csv(out / "percall.csv")
    assert {(int(r["M"]), r["method"]) for r in percall} >= {
        (m, meth) for m in (1, 16, 128) for meth in ("floor", "lora_ext_layer", "lora_ext_op")
    }
    for r in percall:
        assert float(r["fwd_bwd_us"]) > 0 and r["cpu_capability"]
        if r["method"] == "floor":
            assert float(r["over_floor_us"]) == 0
    nf4 = _csv(out / "nf4.csv")
    timed = {r["method"]: r for r in nf4 if r["bench"] == "nf4" and not r.get("error")}
    assert {"base", "lora_ext"} <= set(timed) and float(timed["lora_ext"]["fwd_bwd_ms"]) > 0
    bits = [float(r["bits_per_param"]) for r in nf4 if r["bench"] == "nf4_bits"]
    assert bits and all(4.0 < b < 4.6 for b in bits)


def test_mixed_csv(quick_run):
    out, stdout = quick_run
    rows = _csv(out / "mixed.csv")
    got = {(int(r["n_adapters"]), r["method"], r["op"]) for r in rows}
    methods = {"base", "dense", "lora_ext" if lora_ext.extension_loaded() else "lora_ext[fallback]", "peft"}
    assert got >= {(n, m, op) for n in (1, 4, 16) for m in methods for op in ("forward", "fwd+bwd")}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["vs_dense"]) > 0
        if r["method"] == "dense":
            assert float(r["vs_dense"]) == 1.0
    assert "mixed-adapter batches" in stdout


def test_dora_csv(quick_run):
    out, stdout = quick_run
    rows = _csv(out / "dora.csv")
    assert {r["method"] for r in rows} == {"base", "peft_lora", "lora_ext_lora", "peft_dora", "lora_ext_dora"}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["peak_mem_MiB"]) >= 0 and r["cpu_capability"]
    assert "DoRA layer (fwd+bwd)" in stdout


def test_report_plots_and_json(quick_run):
    out, stdout = quick_run
    report = (out / "report.md").read_text()
    assert report.startswith("# lora_ext benchmark")
    assert "## LoRA linear" in report and "| base |" in report
    assert "LoRA linear" in stdout  # the terminal table
    assert "== goals" in stdout and "## Goals" in report
    from benchmarks import goals

    for g in goals.GOALS:  # every CPU goal is listed, measured or not
        if g.device == "cpu":
            assert g.text in stdout and g.text in report
    for name in ("overhead.png", "memory.png", "merge.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
        assert f"({name})" in report
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["device"] == "cpu" and results["rows"]
    ft = results["finetune"]
    if ft.get("status") == "ok":
        assert (out / "loss_curve.png").read_bytes()[:8] == PNG_MAGIC
        assert len(_csv(out / "finetune_loss.csv")) == ft["steps"]
        assert ft["merged_same_predictions"]


def test_shape_parsing():
    from benchmarks import common

    shapes = common.parse_shapes("tiny,8192x1024x1024x16", "cpu", quick=False)
    assert (shapes[-1].m, shapes[-1].k, shapes[-1].n, shapes[-1].r) == (8192, 1024, 1024, 16)
    assert common.GOAL_CPU in common.parse_shapes(None, "cpu", quick=False)
    with pytest.raises(SystemExit):
        common.parse_shapes("8192x1024", "cpu", quick=False)


def test_goals_from_one_table():
    """The goal table reads the rows it names: met, NOT MET, or not measured when the row is absent."""
    from benchmarks import goals

    row = dict(bench="lora_linear", M=8192, K=1024, N=1024, r=16, dtype="fp32", method="lora_ext[auto]")
    verdicts = lambda rows: {g[0]: g[4] for g in goals.evaluate(rows, "cpu")}  # noqa: E731
    text = "lora_linear fp32 M=8192 K=N=1024 r=16: fwd+bwd ÷ frozen base"
    assert verdicts([])[text] == "not measured"
    assert verdicts([{**row, "ratio_fwd_bwd": 1.04}])[text] == "met"
    assert verdicts([{**row, "ratio_fwd_bwd": 1.2}])[text] == "NOT MET"
    assert verdicts([{**row, "ratio_fwd_bwd": 1.04, "error": "x"}])[text] == "not measured"
    assert all(g.device in ("cpu", "cuda") and g.op in ("<=", "<", ">=") for g in goals.GOALS)
    assert {g.device for g in goals.GOALS} == {"cpu", "cuda"}


def test_timer_inner_and_repeats():
    from benchmarks import common

    calls = []
    s = common.Settings(warmup=1, min_runs=3, max_runs=3, budget_s=0.0)
    t = common.time_ops({"a": lambda mark: (calls.append(1), mark("p"))}, s, inner=5, repeats=2)
    assert len(calls) == 5 * (1 + 3 * 2) and t["a"].runs == 3 and t["a"].ms["p"] >= 0


def test_shared_fixtures():
    """The tests' tiny Llama and the benchmark's come from one table (benchmarks/fixtures.py)."""
    pytest.importorskip("transformers")
    from benchmarks import fixtures

    cfg = fixtures.llama_config("bench-cpu")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (512, 1376, 4, 2048)
    assert fixtures.llama_config("test-nf4").intermediate_size == 96
    train, test = fixtures.sentiment_task(8, 4)
    assert len(train) == 8 and len(test) == 4 and {y for _, y in train + test} <= {0, 1}
    assert fixtures.sentiment_task(8, 4) == (train, test)  # seeded


def test_outputs_without_matplotlib_or_tqdm(tmp_path):
    """Without matplotlib the run still writes its CSV, JSON and report (plots skipped, ONE
    warning, however many times the outputs are rewritten); without tqdm progress is plain lines."""
    code = f"""
import sys, warnings
sys.modules["matplotlib"] = sys.modules["matplotlib.pyplot"] = sys.modules["tqdm"] = None  # not importable
from benchmarks import common, run
s = common.Settings()
rows = [
    dict(bench="merge", N=64, K=64, r=4, dtype="fp32", method=m, op=op, ms=0.01, GB_per_s=3.0,
         frac_of_copy_bw=1.0, peak_mem_MiB=0.0)
    for m, op in (("copy", "copy"), ("lora_ext", "merge"))
]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):  # the runner rewrites the outputs after every part
        plots = run.write_outputs({str(tmp_path)!r}, common.metadata(s), s, rows, {{"loss_curve": [1.0, 0.5]}}, {{"total": 1.0}})
prog = common.Progress(1, "demo")
prog.update("one")
prog.close()
print("plots", plots, "warnings", sum("matplotlib" in str(w.message) for w in caught))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plots [] warnings 1" in proc.stdout
    assert "[demo 1/1] one" in proc.stderr
    for name in ("merge.csv", "finetune_loss.csv", "results.json", "report.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob("*.png"))
    assert "## merge_ / unmerge_" in (tmp_path / "report.md").read_text()


def test_forced_avx2_run_records_what_forced_it(tmp_path):
    """--cpu-isa avx2 re-executes the run with torch, MKL and oneDNN capped at AVX2 and the fused
    kernels on their avx2 variant; every CSV row says so (what a BENCHMARKS.md AVX2 table from an
    AVX-512 machine is made with)."""
    if not lora_ext.extension_loaded():
        pytest.skip("compiled library not loaded")
    from lora_ext.ops import _loader

    if not _loader._C.cpu_kernel_variants().get("avx2"):
        pytest.skip("this CPU has no AVX2")
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--cpu-isa", "avx2", "--only", "merge"]
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "LORA_EXT_CPU_KERNEL")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _csv(tmp_path / "merge.csv")
    assert rows
    for r in rows:
        assert r["cpu_capability"] == "AVX2" and r["lora_ext_cpu_kernel"] == "avx2", r
        assert (
            "ATEN_CPU_CAPABILITY=avx2" in r["cpu_isa_forced"] and "MKL_ENABLE_INSTRUCTIONS=AVX2" in r["cpu_isa_forced"]
        )
    assert "forced by ATEN_CPU_CAPABILITY=avx2" in (tmp_path / "report.md").read_text()


def test_strategy_sweep_reports_measured_and_modelled_crossovers():
    if not lora_ext.extension_loaded():
        pytest.skip("compiled library not loaded")
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu_kernels", "--strategy", "--quick", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "strategy crossover fp32 K=256 N=256 r=16" in proc.stdout
    assert "forward measured" in proc.stdout and "backward measured" in proc.stdout
    from benchmarks.bench_cpu_kernels import _crossover

    assert _crossover([1, 2, 4, 8], {1: 0.9, 2: 1.1, 4: 0.95, 8: 0.9}) == 4  # from which merge STAYS faster
    assert _crossover([1, 2], {1: 1.2, 2: 1.01}) is None


def test_cpu_isa_rerun_refuses_a_cpu_without_the_isa(monkeypatch):
    """With the switches already set, a torch that still reports another capability (a CPU without
    AVX2, or not x86) stops the run instead of labelling native figures as AVX2 ones."""
    import torch

    from benchmarks import common

    for k, v in common.CPU_ISA_ENV["avx2"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(SystemExit, match="capability DEFAULT, not AVX2"):
        common.rerun_with_cpu_isa("avx2", "benchmarks.run", [])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    common.rerun_with_cpu_isa("avx2", "benchmarks.run", [])  # already in effect: returns, no re-exec
