// Run-time choice of the fused CPU kernel variant (see lowrank.h).
//
//   auto     the widest variant both the CPU and ATen's capability allow: ATen reports
//            AVX512 / AVX2 / DEFAULT from cpuid, capped by ATEN_CPU_CAPABILITY, so the fused
//            kernels follow the same switch as ATen's own kernels (ATEN_CPU_CAPABILITY=avx2 on
//            an AVX-512 CPU gives avx2). The avx512 variant passed tests/test_cpu_kernels.py on
//            an AVX-512 CPU and measured faster than avx2 there (BENCHMARKS.md, 2026-12-02).
//   default  portable loops (vector extensions, baseline ISA)
//   avx2     AVX2 + FMA + F16C
//   avx512   AVX-512 F/BW/VL/DQ + FMA + F16C
//   aten     fused kernels off: the ops run their ATen-GEMM implementation
//
// The start value comes from LORA_EXT_CPU_KERNEL (unset or "auto": auto); set_kernel()
// (exposed as lora_ext._C.set_cpu_kernel) changes it at run time.
#include <ATen/Context.h>
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>

#include "lowrank.h"

namespace lora_ext {
namespace cpu {
namespace {

enum Variant : int { kUnresolved = -1, kAten = 0, kDefault = 1, kAvx2 = 2, kAvx512 = 3 };

bool has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const char* variant_name(int v) {
  switch (v) {
    case kAten:
      return "aten";
    case kDefault:
      return "default";
    case kAvx2:
      return "avx2";
    case kAvx512:
      return "avx512";
    default:
      return "unresolved";
  }
}

// -1 for "auto", -2 for an unknown name.
int parse(const std::string& name) {
  if (name.empty() || name == "auto") return kUnresolved;
  if (name == "aten") return kAten;
  if (name == "default") return kDefault;
  if (name == "avx2") return kAvx2;
  if (name == "avx512") return kAvx512;
  return -2;
}

bool runnable(int v) {
  switch (v) {
    case kAten:
    case kDefault:
      return true;
    case kAvx2:
      return has_avx2();
    case kAvx512:
      return has_avx512();
    default:
      return false;
  }
}

int resolve_auto() {
  const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ... (honours ATEN_CPU_CAPABILITY)
  if (cap == "AVX512" && has_avx512()) return kAvx512;
  if ((cap == "AVX512" || cap == "AVX2") && has_avx2()) return kAvx2;
  return kDefault;
}

int checked(int v, const std::string& name, const char* source) {
  TORCH_CHECK_VALUE(v != -2, "lora_ext: unknown CPU kernel variant '", name, "' (", source,
                    "); expected auto, default, avx2, avx512 or aten");
  if (v == kUnresolved) return resolve_auto();
  TORCH_CHECK_VALUE(runnable(v), "lora_ext: CPU kernel variant '", name, "' (", source,
                    ") needs instructions this CPU lacks (",
                    v == kAvx512 ? "AVX-512 F/BW/VL/DQ, FMA, F16C" : "AVX2, FMA, F16C", "); available: ",
                    has_avx512() ? "default, avx2, avx512"
                    : has_avx2() ? "default, avx2"
                                 : "default",
                    ", aten");
  return v;
}

std::atomic<int> g_variant{kUnresolved};
std::mutex g_mutex;

int current() {
  int v = g_variant.load(std::memory_order_acquire);
  if (v != kUnresolved) return v;
  std::lock_guard<std::mutex> lock(g_mutex);
  v = g_variant.load(std::memory_order_relaxed);
  if (v == kUnresolved) {
    const char* env = std::getenv("LORA_EXT_CPU_KERNEL");
    const std::string name = env ? env : "";
    v = checked(parse(name), name, "LORA_EXT_CPU_KERNEL");
    g_variant.store(v, std::memory_order_release);
  }
  return v;
}

}  // namespace

const Kernels* active_kernels() {
  switch (current()) {
    case kDefault:
      return &kernels_default();
    case kAvx2:
      return &kernels_avx2();
    case kAvx512:
      return &kernels_avx512();
    default:
      return nullptr;
  }
}

std::string active_kernel_name() { return variant_name(current()); }

void set_kernel(const std::string& name) {
  const int v = checked(parse(name), name, "set_cpu_kernel");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_variant.store(v, std::memory_order_release);
}

bool cpu_can_run(const std::string& name) {
  const int v = parse(name);
  return v == kUnresolved || runnable(v);
}

namespace {
std::atomic<int> g_amx{-1};  // -1: not read from LORA_EXT_CPU_AMX yet
}  // namespace

bool amx_enabled() {
  int v = g_amx.load(std::memory_order_acquire);
  if (v < 0) {
    const char* env = std::getenv("LORA_EXT_CPU_AMX");
    v = cpu_has_amx() && !(env && std::string(env) == "0") ? 1 : 0;
    g_amx.store(v, std::memory_order_release);
  }
  return v == 1;
}

void set_amx(bool on) {
  TORCH_CHECK_VALUE(!on || cpu_has_amx(),
                    "lora_ext: AMX needs a CPU with AMX-TILE and AMX-BF16 and an OS that grants the tile state; "
                    "this one does not");
  g_amx.store(on ? 1 : 0, std::memory_order_release);
}

namespace {
enum Bf16Gemm : int { kBf16Unread = -1, kBf16Auto = 0, kBf16Native = 1, kBf16Fp32 = 2 };
std::atomic<int> g_bf16_gemm{kBf16Unread};

int parse_bf16_gemm(const std::string& mode) {
  if (mode == "auto") return kBf16Auto;
  if (mode == "native") return kBf16Native;
  if (mode == "fp32") return kBf16Fp32;
  return kBf16Unread;
}

int bf16_gemm_setting() {
  int v = g_bf16_gemm.load(std::memory_order_acquire);
  if (v == kBf16Unread) {
    const char* env = std::getenv("LORA_EXT_CPU_BF16_GEMM");
    v = env != nullptr && *env != '\0' ? parse_bf16_gemm(env) : kBf16Auto;
    TORCH_CHECK_VALUE(v != kBf16Unread, "lora_ext: LORA_EXT_CPU_BF16_GEMM must be auto, native or fp32, not '", env,
                      "'");
    // a set_bf16_gemm() that ran since the load wins over the environment
    int unread = kBf16Unread;
    if (!g_bf16_gemm.compare_exchange_strong(unread, v, std::memory_order_acq_rel)) v = unread;
  }
  return v;
}

// Whether a oneDNN ISA cap in the environment still allows AMX (oneDNN reads it once per process).
bool onednn_isa_allows_amx() {
  for (const char* var : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
    const char* env = std::getenv(var);
    if (env == nullptr || *env == '\0') continue;
    std::string isa(env);
    for (char& c : isa) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (isa != "ALL" && isa.find("AMX") == std::string::npos) return false;
  }
  return true;
}
}  // namespace

bool bf16_gemm_native() {
  switch (bf16_gemm_setting()) {
    case kBf16Native:
      return true;
    case kBf16Fp32:
      return false;
    default:
      return amx_enabled() && current() == kAvx512 && at::globalContext().userEnabledMkldnn() &&
             onednn_isa_allows_amx();
  }
}

std::string bf16_gemm_mode() {
  switch (bf16_gemm_setting()) {
    case kBf16Native:
      return "native";
    case kBf16Fp32:
      return "fp32";
    default:
      return "auto";
  }
}

void set_bf16_gemm(const std::string& mode) {
  const int v = parse_bf16_gemm(mode);
  TORCH_CHECK_VALUE(v != kBf16Unread, "lora_ext: set_cpu_bf16_gemm: the mode must be 'auto', 'native' or 'fp32', not '",
                    mode, "'");
  g_bf16_gemm.store(v, std::memory_order_release);
}

}  // namespace cpu
}  // namespace lora_ext
