"""Build lora_ext: a torch C++ extension, with CUDA kernels when possible.

CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp) are compiled when torch is a
CUDA build and a CUDA toolkit (nvcc) is found, unless LORA_EXT_SKIP_CUDA=1.

Environment switches:
    LORA_EXT_SKIP_CUDA=1        build the CPU kernels only
    LORA_EXT_FORCE_CUDA=1       fail instead of silently skipping CUDA
    LORA_EXT_CUDA_ARCHS="8.0;9.0"  compute capabilities (default 8.0;9.0, PTX for the newest);
                                an arch nvcc does not support is dropped with a warning
    CUDA_HOME                   toolkit root (else found from nvcc; a wrapper script on PATH is resolved)
    MAX_JOBS                    parallel compile jobs (ninja); default from free memory
    NVCC_THREADS                nvcc --threads (default 2)
    LORA_EXT_PTXAS_VERBOSE=1    pass -Xptxas -v (register/spill report)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The toolkit root for an nvcc on PATH, seeing through wrapper scripts."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as fh:
            head = fh.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it execs
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    candidates.insert(0, os.path.dirname(os.path.dirname(token)))
    except OSError:
        pass
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_root_from_nvcc(nvcc)
    return _toolkit_root_from_nvcc("/usr/local/cuda/bin/nvcc") if os.path.exists("/usr/local/cuda/bin/nvcc") else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_CUDA_HOME = None if _env_flag("LORA_EXT_SKIP_CUDA") else _find_cuda_home()
if _CUDA_HOME:
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvcc_archs(cuda_home: str) -> set[str]:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.strip().split("_")[-1] for line in out.splitlines() if line.strip().startswith("compute_")}


def _cuda_arch_list(cuda_home: str) -> str:
    wanted = [
        a.strip() for a in os.environ.get("LORA_EXT_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()
    ]
    supported = _nvcc_archs(cuda_home)
    archs = []
    for arch in wanted:
        base = arch.replace("+PTX", "")
        if supported and base.replace(".", "") not in supported:
            warnings.warn(f"lora_ext: nvcc does not support compute capability {base}; skipping it", stacklevel=2)
            continue
        archs.append(base)
    if not archs:
        raise RuntimeError(f"lora_ext: none of LORA_EXT_CUDA_ARCHS={wanted} is supported by this nvcc")
    archs = sorted(set(archs), key=float)
    archs[-1] += "+PTX"  # PTX for the newest so future GPUs can JIT it
    return ";".join(archs)


def _nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Include and library dirs of the nvidia-* pip wheels that a CUDA torch installs (cuBLAS lives there)."""
    includes, libs = [], []
    for site in sys.path:
        nv = os.path.join(site, "nvidia")
        if not os.path.isdir(nv):
            continue
        for sub in sorted(glob.glob(os.path.join(nv, "*"))):
            if os.path.isdir(os.path.join(sub, "include")):
                includes.append(os.path.join(sub, "include"))
            if os.path.isdir(os.path.join(sub, "lib")):
                libs.append(os.path.join(sub, "lib"))
    return includes, libs


def _cublas_link_args(lib_dirs: list[str]) -> list[str]:
    for d in lib_dirs:
        if glob.glob(os.path.join(d, "libcublas.so")):
            return [f"-L{d}", "-lcublas", f"-Wl,-rpath,{d}"]
    for d in lib_dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcublas.so.*")))
        if versioned:
            return [f"-L{d}", f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{d}"]
    raise RuntimeError(f"lora_ext: libcublas not found in {lib_dirs}; set CUDA_HOME or install torch's nvidia wheels")


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:
        with open("/proc/meminfo") as fh:
            avail_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable"))
        jobs = max(1, min(os.cpu_count() or 1, avail_kb // (3 * 1024 * 1024)))  # ~3 GB per nvcc/g++ job
    except (OSError, StopIteration):
        jobs = 1
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    _default_max_jobs()
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/cpu/kernels/*.cpp")
    torch_version = torch.__version__.split("+")[0]
    cxx = [
        "-O3",
        "-DNDEBUG",
        f'-DLORA_EXT_TORCH_VERSION="{torch_version}"',
        f'-DLORA_EXT_TORCH_FULL_VERSION="{torch.__version__}"',  # marker read by lora_ext/_loader.py
    ]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # at::parallel_for runs its body on ATen's OpenMP threads only in code compiled with OpenMP
    # (ATen/ParallelOpenMP.h: without _OPENMP it is a plain serial loop). The extension links
    # libgomp.so.1, the runtime torch already loaded (one thread pool, torch.set_num_threads applies).
    omp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    cxx += omp

    want_cuda = not _env_flag("LORA_EXT_SKIP_CUDA")
    why_not = None
    if want_cuda and torch.version.cuda is None:
        why_not = "torch is a CPU-only build"
    elif want_cuda and not _CUDA_HOME:
        why_not = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if want_cuda and why_not:
        if _env_flag("LORA_EXT_FORCE_CUDA"):
            raise RuntimeError(f"lora_ext: LORA_EXT_FORCE_CUDA=1 but {why_not}")
        print(f"lora_ext: building without CUDA kernels ({why_not})", file=sys.stderr)
        want_cuda = False

    if not want_cuda:
        return [
            CppExtension(
                "lora_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=omp
            )
        ]

    arch_list = _cuda_arch_list(_CUDA_HOME)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # torch turns this into -gencode flags
    wheel_includes, wheel_libs = _nvidia_wheel_dirs()
    include_dirs += [os.path.join(_CUDA_HOME, "include")] + wheel_includes
    lib_dirs = [os.path.join(_CUDA_HOME, "lib64"), os.path.join(_CUDA_HOME, "lib")] + wheel_libs
    defines = ["-DLORA_EXT_WITH_CUDA", f'-DLORA_EXT_CUDA_ARCHS="{arch_list}"']
    nvcc = ["-O3", "-DNDEBUG", "-lineinfo", f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + defines
    if _env_flag("LORA_EXT_PTXAS_VERBOSE"):
        nvcc += ["-Xptxas", "-v"]
    sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    print(f"lora_ext: building CUDA kernels for {arch_list} with {_CUDA_HOME}", file=sys.stderr)
    return [
        CUDAExtension(
            "lora_ext._C",
            sources,
            include_dirs=include_dirs,
            library_dirs=[d for d in lib_dirs if os.path.isdir(d)],
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
            extra_link_args=_cublas_link_args([d for d in lib_dirs if os.path.isdir(d)]) + omp,
        )
    ]


setup(
    name="lora_ext",
    version="0.1.0",
    description="Fused LoRA forward/backward and in-place merge as a PyTorch C++/CUDA extension",
    packages=find_packages(include=["lora_ext", "lora_ext.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "safetensors"],
)
