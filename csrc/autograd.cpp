// Autograd of lora_linear in C++, registered on the Autograd alias key (every backend).
//
// The formula is the one of lora_ext/ops/dense.py (which registers it from Python when
// this library is not loaded): the forward saves x, the parameters and the dropout seed
// (nothing activation-sized, no mask), the backward calls lora_linear_backward once with
// the mask of the inputs that need a gradient. On the CPU, when the forward computes
// xa = drop(x) A^T anyway (the shrink/expand strategy) and lora_B needs a gradient, it runs
// lora_linear_xa instead and keeps xa ([M, r], r/K of x's size) for
// lora_linear_backward_xa: grad_B = s g^T xa without a second x A^T (one of the seven
// rank-r products of a step; docs/design.md, "Where the time goes"). Doing this in C++ instead of through
// torch.library.register_autograd removes the Python autograd.Function round trip
// (argument normalisation, ctx bookkeeping, a Python backward) from every call: at
// small M that fixed cost is most of a LoRA layer's time (BENCHMARKS.md, per-call table).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/lora_cpu_fused.h"
#include "host/strategy.h"
#include "ops.h"

namespace lora_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor call_forward(LORA_EXT_LINEAR_PARAMS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_linear", "")
                             .typed<Tensor(LORA_EXT_LINEAR_PARAMS)>();
  return op.call(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
}

GradTuple call_backward(LORA_EXT_LINEAR_BACKWARD_PARAMS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_linear_backward", "")
                             .typed<GradTuple(LORA_EXT_LINEAR_BACKWARD_PARAMS)>();
  return op.call(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask);
}

std::tuple<Tensor, Tensor> call_forward_xa(LORA_EXT_LINEAR_PARAMS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_linear_xa", "")
                             .typed<std::tuple<Tensor, Tensor>(LORA_EXT_LINEAR_PARAMS)>();
  return op.call(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
}

GradTuple call_backward_xa(LORA_EXT_LINEAR_BACKWARD_XA_PARAMS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_linear_backward_xa", "")
                             .typed<GradTuple(LORA_EXT_LINEAR_BACKWARD_XA_PARAMS)>();
  return op.call(grad_out, x, xa, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask);
}

// Whether the forward keeps xa for the backward (see the top of this file): CPU, lora_B
// trainable, concrete sizes (a torch.compile trace with symbolic M keeps the plain pair),
// a branch that is not identically zero, the fused CPU kernels, and the shrink/expand forward
// (the merged one does not compute xa). Arguments the op would reject take the plain pair, whose checks
// raise the op's own errors.
bool keeps_xa(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double dropout_p,
              int64_t strategy) {
  if (!x.is_cpu() || !lora_B.requires_grad()) return false;
  if (x.dim() != 2 || weight.dim() != 2 || lora_A.dim() != 2) return false;
  if (x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  if (!(dropout_p >= 0.0 && dropout_p < 1.0) || strategy < kAuto || strategy > kMerge) return false;
  // the fused kernels compute xa on the way; the ATen path (fp64, r > 128, the "aten" variant) would
  // pay an extra product for it (csrc/cpu/lora_cpu.cpp)
  if (!fused_cpu_kernels_apply(x.scalar_type(), lora_A.size(0))) return false;
  return !resolve_strategy(c10::DeviceType::CPU, x.size(0), weight.size(0), x.size(1), x.element_size(), dropout_p,
                           strategy, native_bf16_gemm(x, weight, lora_A.size(0)))
              .merge_forward;
}

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  // keep_xa: decided by the caller, where grad mode is still visible (apply turns it off here).
  static Tensor forward(AutogradContext* ctx, LORA_EXT_LINEAR_PARAMS, bool keep_xa) {
    Tensor y, xa;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (keep_xa) {
        std::tie(y, xa) = call_forward_xa(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
      } else {
        y = call_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
      }
    }
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_seed = dropout_seed.has_value() && dropout_seed->defined();
    ctx->save_for_backward({x, weight, lora_A, lora_B, has_seed ? *dropout_seed : Tensor(), xa});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["strategy"] = strategy;
    ctx->saved_data["has_bias"] = has_bias;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges exist for the defined tensor inputs only: x, weight, [bias], lora_A, lora_B, [seed].
    const size_t a_edge = has_bias ? 3 : 2;
    const std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(a_edge),
                                      ctx->needs_input_grad(a_edge + 1)};
    variable_list out(10);  // one per forward argument (keep_xa included); undefined = no gradient
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return out;
    const Tensor& seed = saved[4];
    const std::optional<Tensor> seed_opt = seed.defined() ? std::optional<Tensor>(seed) : std::nullopt;
    const Tensor& xa = saved[5];
    const double scale = ctx->saved_data["scale"].toDouble(), p = ctx->saved_data["dropout_p"].toDouble();
    const int64_t strategy = ctx->saved_data["strategy"].toInt();
    auto grads = xa.defined() ? call_backward_xa(grad_outputs[0], saved[0], xa, saved[1], saved[2], saved[3], scale, p,
                                                 seed_opt, strategy, mask)
                              : call_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], scale, p,
                                              seed_opt, strategy, mask);
    if (mask[0]) out[0] = std::get<0>(grads);
    if (mask[1]) out[1] = std::get<1>(grads);
    if (mask[2]) out[2] = std::get<2>(grads);
    if (mask[3]) out[3] = std::get<3>(grads);
    if (mask[4]) out[4] = std::get<4>(grads);
    return out;
  }
};

Tensor lora_linear_autograd(LORA_EXT_LINEAR_PARAMS) {
  // no graph (torch.no_grad, inference): nothing to keep xa for
  const bool keep_xa = at::GradMode::is_enabled() && keeps_xa(x, weight, lora_A, lora_B, dropout_p, strategy);
  return LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, keep_xa);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) { m.impl("lora_linear", &lora_linear_autograd); }

}  // namespace lora_ext
