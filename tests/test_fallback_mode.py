"""Runs the op test files again in a subprocess with LORA_EXT_DISABLE_EXTENSION=1, so the
pure-PyTorch fallback (Python-defined schemas, fallback kernels) passes the same contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import IN_FALLBACK_MODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
def test_op_suite_passes_on_the_fallback():
    env = dict(os.environ, LORA_EXT_DISABLE_EXTENSION="1")
    env.pop("LORA_EXT_REQUIRE_EXTENSION", None)
    files = ["tests/test_ops.py", "tests/test_merge.py", "tests/test_errors.py", "tests/test_dispatcher.py"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    tail = "\n".join(out.stdout.splitlines()[-30:])
    assert out.returncode == 0, f"fallback-mode run failed:\n{tail}\n{out.stderr[-3000:]}"
    assert " passed" in tail
