"""Loading straight into 4 bits: the peak resident memory of FastLanguageModel.from_pretrained(load_in_4bit=True)
on a ~220 MB fp32 Llama stays within the 4-bit model plus two decoder layers in fp32 plus a documented overhead
(benchmarks/fast_memory.py measures it in a fresh subprocess; BENCHMARKS.md has the figures)."""

from __future__ import annotations

import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks import fast_memory  # noqa: E402

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset"),
]

OVERHEAD = 32 << 20  # allocator slack + NF4 quantization temporaries of the largest linear (documented in docs)


def test_4bit_load_peak_memory(tmp_path):
    sizes = fast_memory.save_load_model(str(tmp_path))
    assert 200e6 < sizes["fp32_bytes"] < 240e6 and sizes["shards"] >= 4
    row = fast_memory.measure_load(str(tmp_path), "fast_4bit")
    assert row["hwm_reset"]
    assert row["model_bytes"] < 0.35 * sizes["fp32_bytes"]
    bound = row["model_bytes"] + 2 * sizes["layer_fp32_bytes"] + OVERHEAD
    print(f"peak above start {row['peak_above_start'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, "
          f"4-bit model {row['model_bytes'] / 2**20:.1f} MiB, fp32 model {sizes['fp32_bytes'] / 2**20:.1f} MiB")  # fmt: skip
    assert row["peak_above_start"] <= bound
    assert row["peak_above_start"] < 0.75 * sizes["fp32_bytes"]  # the full-precision model never was in memory
