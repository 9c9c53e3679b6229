"""``python -m lora_ext``: the report, the self-test, and that a broken kernel makes it fail."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import requires_extension

import lora_ext
from lora_ext import __main__ as diag
from lora_ext.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "lora_ext", *args]
    full_env = {k: v for k, v in os.environ.items() if k != "LORA_EXT_REQUIRE_EXTENSION"}
    full_env.update(PYTHONPATH=ROOT, **env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_selftest_table_covers_every_op():
    assert set(diag.SELFTEST_OPS) == set(diag.op_names())
    assert {"lora_linear", "merge_", "nf4_dequantize", "lora_linear_nf4_backward"} <= set(diag.op_names())


@requires_extension
def test_module_runs_reports_every_op_and_passes():
    proc = _run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for section in ("== versions", "== build", "cpu_capability", "cpu_kernels", "== ops", "== self-test"):
        assert section in out
    for name in diag.op_names():
        assert f"  {name} " in out, name  # its line in the implementation table
        if diag.implementation(name, "cpu") == "compiled":
            assert re.search(rf"PASS {name} +cpu +", out), name
    assert "FAIL" not in out


def test_json_without_selftest(capsys):
    assert diag.main(["--json", "--no-selftest"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__
    assert info["build"]["extension_loaded"] == lora_ext.extension_loaded()
    assert set(info["ops"]) == set(diag.op_names())
    assert all(impl["cpu"] in ("compiled", diag.FALLBACK) for impl in info["ops"].values())
    assert info["selftest"] == [] and info["status"] == 0


def test_fallback_only_has_nothing_to_selftest():
    proc = _run(LORA_EXT_DISABLE_EXTENSION="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled library not loaded: nothing to self-test" in proc.stdout
    assert diag.FALLBACK in proc.stdout and "PASS" not in proc.stdout


@pytest.mark.parametrize("require,status", [("1", 1), ("0", 0)])
def test_not_loaded_exit_status_follows_require_extension(monkeypatch, capsys, require, status):
    monkeypatch.setattr(lora_ext, "build_info", lambda: {"extension_loaded": False, "load_error": "test"})
    monkeypatch.setenv("LORA_EXT_REQUIRE_EXTENSION", require)
    assert diag.main([]) == status
    assert "nothing to self-test" in capsys.readouterr().out


@requires_extension
def test_broken_kernel_fails_the_selftest():
    """A real break: a wrong CPU kernel for merged_weight (drops the adapter term) replaces the
    compiled one in the dispatcher before the diagnostic runs; its line FAILs, the exit status is 1."""
    code = (
        "import sys, warnings, torch, lora_ext\n"
        "from lora_ext.__main__ import main\n"
        "lib = torch.library.Library('lora_ext', 'IMPL')\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')  # 'Overriding a previously registered kernel'\n"
        "    lib.impl('merged_weight', lambda w, a, b, s: w.clone(), 'CPU')\n"
        "sys.exit(main([]))\n"
    )
    proc = _run(code=code)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.strip().startswith("FAIL")]
    assert failed and all(" merged_weight " in line and " cpu " in line for line in failed), failed
    assert any(line.strip().startswith("PASS") and " merge_ " in line for line in lines)
    assert "FAILED" in proc.stdout


@requires_extension
def test_injected_wrong_reference_fails_only_that_op():
    def wrong(weight, lora_A, lora_B, scale):  # merge_ with the sign of the adapter flipped
        reference.merge_(weight, lora_A, lora_B, -scale)

    ops = dict(diag.SELFTEST_OPS)
    ops["merge_"] = dataclasses.replace(ops["merge_"], reference=wrong)
    results = diag.run_selftest(devices=[torch.device("cpu")], ops=ops)
    bad = {(r.op, r.dtype) for r in results if not r.passed}
    assert bad == {("merge_", "fp32"), ("merge_", "bf16")}, results
    assert all(r.max_err > r.tol for r in results if not r.passed)


@requires_extension
def test_exact_ops_are_bit_exact_and_raising_ops_fail():
    results = diag.run_selftest(devices=[torch.device("cpu")], ops={"dropout_mask": diag.SELFTEST_OPS["dropout_mask"]})
    assert [(r.passed, r.max_err, r.tol) for r in results] == [(True, 0.0, 0.0)]

    def raises(*args):
        raise RuntimeError("boom")

    broken = {"nf4_quantize": dataclasses.replace(diag.SELFTEST_OPS["nf4_quantize"], reference=raises)}
    results = diag.run_selftest(devices=[torch.device("cpu")], ops=broken)
    assert results and not any(r.passed for r in results)
    assert all("RuntimeError: boom" in r.detail for r in results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@requires_extension
def test_selftest_covers_cuda_devices():
    results = diag.run_selftest(devices=[torch.device("cuda", 0)])
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
