"""Runs the op test files again in a subprocess with LORA_EXT_DISABLE_EXTENSION=1, so the
pure-PyTorch fallback (Python-defined schemas, fallback kernels) passes the same contract."""

from __future__ import annotations

import pytest
from conftest import IN_FALLBACK_MODE, run_in_fallback_mode


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
def test_op_suite_passes_on_the_fallback():
    files = ["tests/test_ops.py", "tests/test_merge.py", "tests/test_errors.py", "tests/test_dispatcher.py"]
    tail = run_in_fallback_mode(files, timeout=1800)
    assert " passed" in tail
