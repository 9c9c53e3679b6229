"""Smoke test of the benchmark suite: the runner in quick mode on a tiny shape set, into a tmp dir.

Checks that the CSVs, the markdown report and the PNG plots exist and parse,
not the figures themselves (timings on a shared CI machine mean nothing).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

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
        # machine, versions, commit and date on every line
        for key in ("date_utc", "torch", "device", "commit", "cpu"):
            assert r[key], key
    base = [r for r in rows if r["method"] == "base"]
    assert base and all(abs(float(r["ratio_fwd_bwd"]) - 1.0) < 1e-9 for r in base)


def test_merge_and_e2e_csv(quick_run):
    out, _ = quick_run
    merge = _csv(out / "merge.csv")
    assert {r["bench"] for r in merge} == {"merge", "merge_drift"}
    assert any(r["method"] == "copy" for r in merge)
    assert all(float(r["GB_per_s"]) > 0 for r in merge if r["bench"] == "merge")
    e2e = _csv(out / "e2e.csv")
    assert {r["model"] for r in e2e} == {"tiny-llama", "all-MiniLM-L6-v2"}
    for r in e2e:
        if r["status"] == "ok":
            assert float(r["step_ms"]) > 0 and float(r["peak_mem_MiB"]) > 0
        else:
            assert r["reason"]


def test_report_plots_and_json(quick_run):
    out, stdout = quick_run
    report = (out / "report.md").read_text()
    assert report.startswith("# lora_ext benchmark")
    assert "## LoRA linear" in report and "| base |" in report
    assert "LoRA linear" in stdout  # the terminal table
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
