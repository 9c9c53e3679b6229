// The pybind11 module: introspection helpers only. Importing it loads this
// shared library, whose static initialisers register the op schemas
// (registration.cpp) and the CPU/CUDA kernels with the dispatcher.
#include <ATen/Parallel.h>
#include <c10/core/Device.h>
#include <torch/extension.h>

#include <mutex>
#include <set>
#include <string>

#include "cpu/kernels/lowrank.h"
#include "host/checks.h"
#include "host/strategy.h"

#ifndef LORA_EXT_TORCH_VERSION
#define LORA_EXT_TORCH_VERSION "unknown"
#endif
#ifndef LORA_EXT_TORCH_FULL_VERSION
#define LORA_EXT_TORCH_FULL_VERSION LORA_EXT_TORCH_VERSION
#endif
#ifndef LORA_EXT_CUDA_ARCHS
#define LORA_EXT_CUDA_ARCHS ""
#endif

#ifdef LORA_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

// Read from the file by lora_ext/ops/_loader.py *before* the library is imported, so that a
// library built against another torch (another C++ ABI) is refused instead of loaded.
extern "C" __attribute__((used, visibility("default"))) const char lora_ext_built_against_torch[] =
    "LORA_EXT_BUILT_AGAINST_TORCH=" LORA_EXT_TORCH_FULL_VERSION ";";

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef LORA_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(LORA_EXT_CUDA_ARCHS);
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["cuda_version"] = pybind11::none();
#endif
  info["torch_version"] = std::string(LORA_EXT_TORCH_VERSION);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["cxx11_abi"] = bool(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

// Which strategy the kernels of `device` ("cpu", "cuda", ...) take for a shape (forward,
// backward): host/strategy.h resolve_strategy, the very function the kernels call.
// bf16: the weight is bf16, so the CPU may run its GEMMs natively (cpu::bf16_gemm_native(); for
// ranks the fused kernels take, r <= 128).
pybind11::dict strategy_plan(int64_t M, int64_t N, int64_t K, int64_t element_size, double dropout_p, int64_t strategy,
                             const std::string& device, bool bf16) {
  lora_ext::check_strategy(strategy);
  const c10::DeviceType type = c10::Device(device).type();
  const bool native = type == c10::DeviceType::CPU && bf16 && lora_ext::cpu::active_kernels() != nullptr &&
                      lora_ext::cpu::bf16_gemm_native();
  const lora_ext::StrategyPlan plan =
      lora_ext::resolve_strategy(type, M, N, K, element_size, dropout_p, strategy, native);
  pybind11::dict out;
  out["forward"] = plan.merge_forward ? "merge" : "shrink_expand";
  out["backward"] = plan.merge_backward ? "merge" : "shrink_expand";
  return out;
}

std::string set_cpu_kernel(const std::string& name) {
  lora_ext::cpu::set_kernel(name);
  return lora_ext::cpu::active_kernel_name();
}

pybind11::dict cpu_kernel_variants() {
  pybind11::dict out;
  for (const char* name : {"default", "avx2", "avx512", "aten"}) out[name] = lora_ext::cpu::cpu_can_run(name);
  return out;
}

pybind11::dict cpu_amx() {
  pybind11::dict out;
  out["available"] = lora_ext::cpu::cpu_has_amx();
  out["enabled"] = lora_ext::cpu::amx_enabled();
  // whether a bf16 merge runs on it now: enabled and the active variant has the kernel (avx512 does)
  const lora_ext::cpu::Kernels* kr = lora_ext::cpu::active_kernels();
  out["in_use"] = lora_ext::cpu::amx_enabled() && kr != nullptr && kr->merge_bf16_amx != nullptr;
  return out;
}

pybind11::dict cpu_bf16_gemm() {
  pybind11::dict out;
  out["mode"] = lora_ext::cpu::bf16_gemm_mode();
  out["native"] = lora_ext::cpu::active_kernels() != nullptr && lora_ext::cpu::bf16_gemm_native();
  return out;
}

pybind11::dict set_cpu_bf16_gemm(const std::string& mode) {
  lora_ext::cpu::set_bf16_gemm(mode);
  return cpu_bf16_gemm();
}

// How many distinct threads one at::parallel_for of this library runs its body on: ATen's thread
// count when the library was compiled with OpenMP (ATen/ParallelOpenMP.h), 1 when it was not (then
// every parallel_for of the CPU kernels is a serial loop).
int64_t parallel_threads_used() {
  std::mutex mu;
  std::set<int> ids;
  at::parallel_for(0, 4 * int64_t(at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mu);
    ids.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_ext compiled kernels (ops are registered under torch.ops.lora_ext)";
  m.def("build_info", &build_info, "How this library was built: CUDA kernels, archs, torch and CUDA versions.");
  m.def("strategy_plan", &strategy_plan, "Strategy (merge or shrink_expand) the kernels pick for forward and backward.",
        pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("element_size"),
        pybind11::arg("dropout_p"), pybind11::arg("strategy"), pybind11::arg("device") = "cpu",
        pybind11::arg("bf16") = false);
  m.def("cpu_kernel", &lora_ext::cpu::active_kernel_name,
        "Active CPU kernel variant for the rank-r products and merge: default, avx2, avx512 or aten (fused off).");
  m.def("set_cpu_kernel", &set_cpu_kernel,
        "Force the CPU kernel variant (auto, default, avx2, avx512 or aten); raises ValueError for an unknown "
        "name or one this CPU cannot run. Returns the variant now active.",
        pybind11::arg("name"));
  m.def("cpu_kernel_variants", &cpu_kernel_variants, "Which CPU kernel variants this CPU can run.");
  m.def("cpu_amx", &cpu_amx,
        "AMX for the bf16 merge: {'available': CPU and OS allow it, 'enabled': switched on (LORA_EXT_CPU_AMX=0 "
        "turns it off at start), 'in_use': enabled and the active CPU kernel variant (avx512) has the AMX kernel}.");
  m.def("set_cpu_amx", &lora_ext::cpu::set_amx,
        "Use AMX for the bf16 merge (True) or not (False); True raises ValueError where it is not available.",
        pybind11::arg("on"));
  m.def("cpu_bf16_gemm", &cpu_bf16_gemm,
        "Where the CPU's bf16 base GEMMs run: {'mode': 'auto' | 'native' | 'fp32' (LORA_EXT_CPU_BF16_GEMM at "
        "start), 'native': whether they run on torch's bf16 GEMM now (auto: AMX enabled, the avx512 variant, "
        "oneDNN on), else on fp32 chunks}.");
  m.def("set_cpu_bf16_gemm", &set_cpu_bf16_gemm,
        "Set where the CPU's bf16 base GEMMs run ('auto', 'native' or 'fp32'; ValueError otherwise); returns "
        "cpu_bf16_gemm().",
        pybind11::arg("mode"));
  m.def("parallel_threads_used", &parallel_threads_used,
        "Distinct threads one at::parallel_for of this library runs on (torch.get_num_threads() when it was "
        "compiled with OpenMP, else 1).");
}
