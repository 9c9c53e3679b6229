"""``python -m lora_ext [--no-selftest] [--json]``: the first thing to run on a new machine.

Prints the versions (Python, torch and its CUDA runtime, lora_ext, peft, transformers,
bitsandbytes), how the compiled library was built (:func:`lora_ext.build_info`), the CPU
capability torch dispatches to, which implementation every op takes on every available
device ("compiled" or "fallback (pure PyTorch)"), then a self-test of a few seconds.

Self-test: every op with a compiled kernel on a device (the CPU, each CUDA device) is
called through the dispatcher (``torch.ops.lora_ext.<op>``) on small odd shapes (M=37,
K=129, N=67, r=5; NF4 blocksize 64 with a tail block and an odd element count) and
compared with the op's pure-PyTorch fallback kernel (its ``reference`` in the registry,
lora_ext/ops/_library.py; lora_ext/ops/reference.py) called directly, in fp32 and bf16.
Rule, per output:

- bit-exact for the ops whose contract is exact: dropout_mask (same hash everywhere),
  nf4_quantize, blockwise_quantize_8bit and nf4_dequantize (bit-compatible with bitsandbytes);
- otherwise ``max|compiled - fallback| <= (2 eps(dtype) + sqrt(L) eps(fp32)) * max(1, max|fallback|)``
  with L = max(M, K, N) the longest reduction: both round once from fp32 accumulators, so
  they may differ by an ulp of the output dtype plus fp32 summation-order noise. A wrong
  kernel (bad index, scale, mask or missing term) misses this by orders of magnitude.

Exit status: 1 if any self-test line FAILs, or if the compiled library is not loaded and
``LORA_EXT_REQUIRE_EXTENSION=1``; else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

import lora_ext
from lora_ext.ops import _library, reference
from lora_ext.ops import dora as _dora_ops

M, K, N, R = 37, 129, 67, 5  # odd sizes: every tile and vector loop has a tail
REDUCTION = max(M, K, N)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FALLBACK = "fallback (pure PyTorch)"


@dataclass
class SelfTestOp:
    """One op of the self-test: the inputs to call it with and how to judge its outputs."""

    cases: Callable[[torch.device, torch.dtype], list[tuple]]  # positional args of each call
    exact: bool = False  # bit-exact contract
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    inplace: bool = False  # returns nothing, writes its first argument
    reference: Callable[..., Any] | None = None  # None: the registry's pure-PyTorch kernel


@dataclass
class Result:
    """One PASS/FAIL line: op, device, dtype, max error against the fallback and the bound."""

    op: str
    device: str
    dtype: str
    passed: bool
    max_err: float
    tol: float
    detail: str = ""


def op_names() -> list[str]:
    """Every op of the ``lora_ext`` namespace (the op registry, lora_ext/ops/_library.py)."""
    return list(_library.OPS)


def implementation(name: str, device_type: str) -> str:
    """What op ``name`` runs on ``device_type`` ("cpu", "cuda"): "compiled", FALLBACK or "none"."""
    key = device_type.upper()
    if key in _library.fallback_dispatch_keys(name):
        return FALLBACK
    return "compiled" if torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{name}", key) else "none"


def default_devices() -> list[torch.device]:
    """The CPU and every visible CUDA device."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(n)]


# ------------------------------------------------------------------ inputs


def _rand(dev: torch.device, dtype: torch.dtype, *shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)


def _lora(dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = _rand(dev, dt, M, K, seed=1)
    w = _rand(dev, dt, N, K, seed=2, scale=K**-0.5)
    a = _rand(dev, dt, R, K, seed=3, scale=K**-0.5)
    b = _rand(dev, dt, N, R, seed=4, scale=R**-0.5)
    return x, w, a, b, _rand(dev, dt, N, seed=5), _rand(dev, dt, M, N, seed=6)


def _seed(dev: torch.device) -> torch.Tensor:
    return torch.tensor(20240917, dtype=torch.int64, device=dev)


def _nf4_storage(dev: torch.device) -> list[tuple]:
    """(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize): plain and double-quantized."""
    w = _rand(torch.device("cpu"), torch.float32, N, K, seed=7, scale=K**-0.5)
    packed, absmax = reference.nf4_quantize(w, 64)
    code, nb = reference.dynamic_map(), reference.NESTED_BLOCKSIZE
    offset = absmax.mean()
    qabs, nested = reference.blockwise_quantize_8bit(absmax - offset, code, nb)
    plain = (packed.to(dev), absmax.to(dev), None, None, 0.0, 64, nb)
    return [plain, (packed.to(dev), qabs.to(dev), nested.to(dev), code.to(dev), float(offset), 64, nb)]


def _lora_linear(dev, dt):
    x, w, a, b, bias, _ = _lora(dev, dt)
    return [(x, w, bias, a, b, 1.5, 0.25, _seed(dev), 1), (x, w, None, a, b, 1.5, 0.0, None, 2)]


def _lora_backward(dev, dt):
    x, w, a, b, _, g = _lora(dev, dt)
    return [(g, x, w, a, b, 1.5, 0.25, _seed(dev), 1, [True] * 5), (g, x, w, a, b, 1.5, 0.0, None, 2, [True] * 5)]


def _lora_backward_xa(dev, dt):
    cases = []
    for g, x, w, a, b, scale, p, seed, strategy, mask in _lora_backward(dev, dt):
        _, xa = reference.lora_linear_xa(x, w, None, a, b, scale, p, seed, strategy)
        cases.append((g, x, xa, w, a, b, scale, p, seed, strategy, mask))
    return cases


def _merge(dev, dt):
    _, w, a, b, _, _ = _lora(dev, dt)
    return [(w, a, b, 0.7), (_rand(dev, dt, K, N, seed=8).t(), a, b, -0.7)]  # row- and column-major W


def _dropout(dev, dt):
    return [(_seed(dev), M, K, 0.3), (_seed(dev), 3, 4099, 0.5)]


def _quantize(dev, dt):
    return [(_rand(dev, dt, N, K, seed=9), 64), (_rand(dev, dt, 7, 33, seed=10), 32)]


def _quantize_8bit(dev, dt):
    x = torch.cat([torch.zeros(256), _rand(torch.device("cpu"), torch.float32, 745, seed=11, scale=0.1)])
    return [(x.to(dev), reference.dynamic_map(dev), 256)]  # an all-zero block and a tail block


def _dequantize(dev, dt):
    return [(*s, [N, K], dt) for s in _nf4_storage(dev)]


def _lora_nf4(dev, dt):
    x, _, a, b, bias, _ = _lora(dev, dt)
    plain, dq = _nf4_storage(dev)
    return [(x, *dq, N, bias, a, b, 1.5, 0.25, _seed(dev)), (x, *plain, N, None, a, b, 1.5, 0.0, None)]


def _dora_args(dev, dt):
    x, w, a, b, bias, g = _lora(dev, dt)
    mag = (w.double().norm(dim=1) * 1.1).to(dt)
    norm = _dora_ops._weight_norm_ref(w, a, b, 1.5, None)
    return x, w, a, b, bias, g, mag, norm


def _dora_norm(dev, dt):
    _, w, a, b, _, _, _, _ = _dora_args(dev, dt)
    return [(w, a, b, 1.5, None), (w, a, b, -0.7, _dora_ops.weight_sq_norm(w))]


def _dora_linear(dev, dt):
    x, w, a, b, bias, _, mag, norm = _dora_args(dev, dt)
    return [(x, w, bias, a, b, mag, norm, 1.5, 0.25, _seed(dev)), (x, w, None, a, b, mag, norm, 1.5, 0.0, None)]


def _dora_backward(dev, dt):
    x, w, a, b, _, g, mag, norm = _dora_args(dev, dt)
    return [
        (g, x, w, a, b, mag, norm, 1.5, 0.25, _seed(dev), [True] * 6),
        (g, x, w, a, b, mag, norm, 1.5, 0.0, None, [True] * 6),
    ]


def _mixed_args(dev, dt):
    x, w, _, _, bias, g = _lora(dev, dt)
    a = _rand(dev, dt, 3, R, K, seed=12, scale=K**-0.5)  # three adapters
    b = _rand(dev, dt, 3, N, R, seed=13, scale=R**-0.5)
    index = (torch.arange(M) % 4 - 1).to(dev)  # -1 (base only), 0, 1, 2 interleaved
    return x, w, bias, a, b, g, index


def _mixed(dev, dt):
    x, w, bias, a, b, _, index = _mixed_args(dev, dt)
    return [
        (x, w, bias, a, b, [1.5, -0.5, 2.0], index, [0.25, 0.0, 0.1], _seed(dev)),
        (x, w, None, a, b, [1.5, -0.5, 2.0], index, [0.0, 0.0, 0.0], None),
    ]


def _mixed_backward(dev, dt):
    x, w, _, a, b, g, index = _mixed_args(dev, dt)
    return [
        (g, x, w, a, b, [1.5, -0.5, 2.0], index, [0.25, 0.0, 0.1], _seed(dev), [True, False, True, True]),
        (g, x, w, a, b, [1.5, -0.5, 2.0], index, [0.0, 0.0, 0.0], None, [True, False, True, True]),
    ]


def _merge_exact(dev, dt):
    _, w, a, b, _, _ = _lora(dev, dt)
    return [(w, a * 30, b, 0.7), (_rand(dev, dt, K, N, seed=8).t(), a, b, -0.7)]  # |ΔW| ~ |W|; column-major W


def _unmerge_exact(dev, dt):
    cases = []
    for w, a, b, s in _merge_exact(dev, dt):
        merged = w.clone()
        index, value = _library.OPS["merge_exact_"].reference(merged, a, b, s)  # the record of the fallback
        cases.append((merged, a, b, s, index, value))
    return cases


def _lora_nf4_backward(dev, dt):
    x, _, a, b, _, g = _lora(dev, dt)
    plain, dq = _nf4_storage(dev)
    return [
        (g, x, *dq, N, a, b, 1.5, 0.25, _seed(dev), [True] * 4),
        (g, x, *plain, N, a, b, 1.5, 0.0, None, [True] * 4),
    ]


SELFTEST_OPS: dict[str, SelfTestOp] = {
    "lora_linear": SelfTestOp(_lora_linear),
    "lora_linear_backward": SelfTestOp(_lora_backward),
    "lora_linear_xa": SelfTestOp(_lora_linear),
    "lora_linear_backward_xa": SelfTestOp(_lora_backward_xa),
    "merge_": SelfTestOp(_merge, inplace=True),
    "merged_weight": SelfTestOp(_merge),
    "dropout_mask": SelfTestOp(_dropout, exact=True, dtypes=("-",)),
    "nf4_quantize": SelfTestOp(_quantize, exact=True),
    "blockwise_quantize_8bit": SelfTestOp(_quantize_8bit, exact=True, dtypes=("fp32",)),
    "nf4_dequantize": SelfTestOp(_dequantize, exact=True),
    "lora_linear_nf4": SelfTestOp(_lora_nf4),
    "lora_linear_nf4_backward": SelfTestOp(_lora_nf4_backward),
    "dora_weight_norm": SelfTestOp(_dora_norm),
    "dora_linear": SelfTestOp(_dora_linear),
    "dora_linear_backward": SelfTestOp(_dora_backward),
    "lora_linear_mixed": SelfTestOp(_mixed),
    "lora_linear_mixed_backward": SelfTestOp(_mixed_backward),
    "merge_exact_": SelfTestOp(_merge_exact, exact=True, inplace=True),  # same bits and record on every path
    "unmerge_exact_": SelfTestOp(_unmerge_exact, exact=True, inplace=True),
}


# ------------------------------------------------------------------ self-test


def _outputs(fn: Callable[..., Any], args: tuple, inplace: bool) -> list[torch.Tensor]:
    args = tuple(a.clone() if isinstance(a, torch.Tensor) and inplace else a for a in args)
    out = fn(*args)
    outs = [] if out is None else list(out) if isinstance(out, (tuple, list)) else [out]
    return [args[0], *outs] if inplace else outs


def _compare(got: torch.Tensor, ref: torch.Tensor, exact: bool) -> tuple[float, float]:
    """(max error, bound) of one output; raises AssertionError on a shape/dtype mismatch."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (
        f"{got.dtype}{list(got.shape)} != {ref.dtype}{list(ref.shape)}"
    )
    if got.numel() == 0:
        return 0.0, 0.0
    if exact:
        if not ref.is_floating_point():  # bool masks, uint8 codes: largest code difference
            return float((got.cpu().long() - ref.cpu().long()).abs().max()), 0.0
        if torch.equal(got, ref):
            return 0.0, 0.0
        diff = (got.double().cpu() - ref.double().cpu()).abs().max().item()
        return (diff if math.isfinite(diff) and diff > 0 else math.inf), 0.0
    diff = (got.double().cpu() - ref.double().cpu()).abs().max().item()
    mag = max(1.0, ref.double().abs().max().item())
    tol = (2 * torch.finfo(ref.dtype).eps + math.sqrt(REDUCTION) * torch.finfo(torch.float32).eps) * mag
    return (diff if math.isfinite(diff) else math.inf), tol


def run_selftest(
    devices: Sequence[torch.device] | None = None, ops: dict[str, SelfTestOp] | None = None
) -> list[Result]:
    """Compiled op (through the dispatcher) vs its fallback kernel on every device with a compiled kernel."""
    ops = SELFTEST_OPS if ops is None else ops
    results = []
    for dev in default_devices() if devices is None else devices:
        for name, spec in ops.items():
            if implementation(name, dev.type) != "compiled":
                continue
            for dt_name in spec.dtypes:
                dt = DTYPES.get(dt_name, torch.float32)
                err, tol, ratio, passed, detail = 0.0, 0.0, -1.0, True, ""
                try:
                    for args in spec.cases(dev, dt):
                        got = _outputs(getattr(torch.ops.lora_ext, name), args, spec.inplace)
                        ref = _outputs(spec.reference or _library.OPS[name].reference, args, spec.inplace)
                        assert len(got) == len(ref), f"{len(got)} outputs, the fallback gives {len(ref)}"
                        for g, r in zip(got, ref):
                            e, t = _compare(g, r, spec.exact)
                            passed = passed and e <= t
                            q = e / t if t > 0 else (0.0 if e == 0 else math.inf)
                            if q > ratio:  # report the output closest to (or furthest past) its bound
                                err, tol, ratio = e, t, q
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                except Exception as exc:  # noqa: BLE001  (an op that raises fails its line)
                    passed, err, detail = False, math.inf, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                results.append(Result(name, str(dev), dt_name, passed, err, tol, detail))
    return results


# ------------------------------------------------------------------ report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _device_name(dev: torch.device) -> str:
    if dev.type != "cuda":
        return _cpu_name()
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{torch.cuda.get_device_name(dev)} (sm_{major}{minor})"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_kernels() -> str:
    """The fused CPU kernel variant in use and whether the bf16 merge runs on AMX (compiled library only)."""
    from .ops import _loader

    C = _loader._C
    if C is None:
        return "none (compiled library not loaded)"
    amx = C.cpu_amx()
    if not amx["available"]:
        amx_s = "not available"
    elif amx["in_use"]:
        amx_s = "on"
    else:
        amx_s = "available, off" + (" (enabled, but the active variant has no AMX kernel)" if amx["enabled"] else "")
    bf16 = C.cpu_bf16_gemm()
    gemm_s = f"bf16 GEMMs {'native (torch bf16)' if bf16['native'] else 'on fp32 chunks'}, mode {bf16['mode']}"
    runnable = ", ".join(k for k, v in C.cpu_kernel_variants().items() if v)
    return f"{C.cpu_kernel()} (runnable: {runnable}; AMX bf16 merge {amx_s}; {gemm_s})"


def report() -> dict[str, Any]:
    """Versions, build info, CPU capability, devices and the op -> implementation table."""
    devices = default_devices()
    return {
        "versions": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_cuda_runtime": torch.version.cuda,
            "lora_ext": lora_ext.__version__,
            "lora_ext_path": os.path.dirname(os.path.abspath(lora_ext.__file__)),
            **{dist: _version(dist) for dist in ("peft", "transformers", "bitsandbytes")},
        },
        "build": lora_ext.build_info(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": _cpu_kernels(),
        "devices": {str(d): _device_name(d) for d in devices},
        "ops": {name: {d.type: implementation(name, d.type) for d in devices} for name in op_names()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report (text or --json) and run the self-test unless --no-selftest; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m lora_ext", description=__doc__.splitlines()[0])
    p.add_argument("--no-selftest", action="store_true", help="only the report")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = p.parse_args(argv)
    info, status, note, results = report(), 0, "", []
    if a.no_selftest:
        note = "self-test skipped (--no-selftest)"
    elif not info["build"]["extension_loaded"]:
        note = "compiled library not loaded: nothing to self-test"
        status = 1 if os.environ.get("LORA_EXT_REQUIRE_EXTENSION") == "1" else 0
    else:
        results = run_selftest()
        status = 0 if results and all(r.passed for r in results) else 1
        note = "" if results else "the library is loaded but no op has a compiled kernel on any device"
    if a.json:
        print(
            json.dumps({**info, "selftest": [asdict(r) for r in results], "note": note, "status": status}, default=str)
        )
        return status
    for title, section in (("versions", info["versions"]), ("build", info["build"]), ("devices", info["devices"])):
        print(f"== {title}\n" + "\n".join(f"  {k}: {v}" for k, v in section.items()))
    print(f"  cpu_capability: {info['cpu_capability']}\n  cpu_kernels: {info['cpu_kernels']}")
    print("== ops (implementation per device)")
    for name, impl in info["ops"].items():
        print(f"  {name:26s} " + "  ".join(f"{dev}: {v}" for dev, v in impl.items()))
    print("== self-test (compiled vs fallback)")
    for r in results:
        bound = "bit-exact" if r.tol == 0 and not r.detail else f"tol {r.tol:.2e}"
        line = f"  {'PASS' if r.passed else 'FAIL'} {r.op:26s} {r.device:7s} {r.dtype:5s} max err {r.max_err:.2e} ({bound})"
        print(line + (f"  {r.detail}" if r.detail else ""))
    if note:
        print(f"  {note}" + (f" ({info['build']['load_error']})" if info["build"]["load_error"] else ""))
    if results:
        failed = sum(not r.passed for r in results)
        print(f"== {'FAILED' if failed else 'OK'}: {len(results) - failed}/{len(results)} passed")
    return status


if __name__ == "__main__":
    sys.exit(main())
