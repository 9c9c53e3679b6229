// The pybind11 module: introspection helpers only. Importing it loads this
// shared library, whose static initialisers register the op schemas
// (registration.cpp) and the CPU/CUDA kernels with the dispatcher.
#include <torch/extension.h>

#include <string>

#ifndef LORA_EXT_TORCH_VERSION
#define LORA_EXT_TORCH_VERSION "unknown"
#endif
#ifndef LORA_EXT_CUDA_ARCHS
#define LORA_EXT_CUDA_ARCHS ""
#endif

#ifdef LORA_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_ext compiled kernels (ops are registered under torch.ops.lora_ext)";
  m.def("build_info", &build_info, "How this library was built: CUDA kernels, archs, torch and CUDA versions.");
}
