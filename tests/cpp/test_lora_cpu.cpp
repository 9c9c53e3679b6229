// C++ tests of the CPU kernels and their dispatcher registration (run by ctest).
// Each check compares against the float64 formula (docs/design.md, "Numerics").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "dropout_hash.h"
#include "ops.h"

namespace {

int g_failed = 0, g_passed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

void test_forward_backward_fp64() {
  const int64_t M = 37, K = 29, N = 23, r = 5;
  const double s = 1.5;
  at::manual_seed(0);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({M, K}, opts), W = at::randn({N, K}, opts), bias = at::randn({N}, opts);
  at::Tensor A = at::randn({r, K}, opts), B = at::randn({N, r}, opts), g = at::randn({M, N}, opts);
  at::Tensor ref = at::addmm(bias, x, W.t()) + s * at::mm(at::mm(x, A.t()), B.t());
  for (int64_t strategy : {1, 2}) {
    at::Tensor y = lora_ext::lora_linear_cpu(x, W, bias, A, B, s, 0.0, std::nullopt, strategy);
    check(max_diff(y, ref) < 1e-10, "forward fp64, strategy " + std::to_string(strategy));
    auto [gx, gw, gb, ga, gB] = lora_ext::lora_linear_backward_cpu(g, x, W, A, B, s, 0.0, std::nullopt, strategy,
                                                                   {true, true, true, true, true});
    check(max_diff(gx, at::mm(g, W) + s * at::mm(at::mm(g, B), A)) < 1e-10, "grad_x fp64");
    check(max_diff(gw, at::mm(g.t(), x)) < 1e-10, "grad_weight fp64");
    check(max_diff(gb, g.sum(0)) < 1e-10, "grad_bias fp64");
    check(max_diff(ga, s * at::mm(at::mm(g, B).t(), x)) < 1e-10, "grad_A fp64");
    check(max_diff(gB, s * at::mm(g.t(), at::mm(x, A.t()))) < 1e-10, "grad_B fp64");
  }
}

void test_dropout_mask_and_branch() {
  const int64_t M = 8, K = 16, N = 4, r = 2;
  const double p = 0.25;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({M, K}, opts), W = at::randn({N, K}, opts), A = at::randn({r, K}, opts),
             B = at::randn({N, r}, opts);
  at::Tensor seed = at::full({}, int64_t(42), at::TensorOptions().dtype(at::kLong));
  at::Tensor keep = lora_ext::dropout_mask_cpu(seed, M, K, p);
  // The mask is the documented hash, element by element.
  bool same = true;
  const uint64_t thr = lora_ext::dropout_threshold(p);
  for (int64_t i = 0; i < M * K; ++i) {
    same &= keep.view({-1})[i].item<bool>() == lora_ext::dropout_keep(42, uint64_t(i), thr);
  }
  check(same, "dropout_mask equals dropout_keep");
  at::Tensor xd = x * keep.to(at::kDouble) / (1.0 - p);
  at::Tensor ref = at::mm(x, W.t()) + 0.5 * at::mm(at::mm(xd, A.t()), B.t());
  at::Tensor y = lora_ext::lora_linear_cpu(x, W, std::nullopt, A, B, 0.5, p, seed, 0);
  check(max_diff(y, ref) < 1e-10, "forward with dropout");
}

void test_merge_roundtrip_and_dispatcher() {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor W = at::randn({33, 47}, opts), A = at::randn({3, 47}, opts), B = at::randn({33, 3}, opts);
  at::Tensor W0 = W.clone();
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("lora_ext::merge_", "")
                .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, double)>();
  op.call(W, A, B, 0.75);
  at::Tensor ref = W0.to(at::kDouble) + 0.75 * at::mm(B.to(at::kDouble), A.to(at::kDouble));
  check(max_diff(W, ref) < 1e-5, "merge_ through the dispatcher");
  lora_ext::merge_cpu(W, A, B, -0.75);
  check(max_diff(W, W0) < 1e-5, "unmerge restores W");
}

void test_errors_name_the_tensor() {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor x = at::randn({4, 6}, opts), W = at::randn({5, 6}, opts), A = at::randn({2, 6}, opts);
  at::Tensor badB = at::randn({4, 2}, opts);
  std::string msg;
  try {
    lora_ext::lora_linear_cpu(x, W, std::nullopt, A, badB, 1.0, 0.0, std::nullopt, 0);
  } catch (const c10::ValueError& e) {  // shapes: ValueError in Python (csrc/host/checks.h)
    msg = e.what();
  } catch (const c10::Error& e) {
    msg = std::string("not a ValueError: ") + e.what();
  }
  check(msg.find("lora_B must be [N, r] = [5, 2]") != std::string::npos, "bad lora_B message: " + msg.substr(0, 200));
  msg.clear();
  try {
    lora_ext::lora_linear_cpu(x.to(at::kDouble), W, std::nullopt, A, at::randn({5, 2}, opts), 1.0, 0.0, std::nullopt,
                              0);
  } catch (const c10::TypeError& e) {  // dtypes: TypeError in Python
    msg = e.what();
  } catch (const c10::Error& e) {
    msg = std::string("not a TypeError: ") + e.what();
  }
  check(msg.find("x has dtype torch.float64 but weight has dtype torch.float32") != std::string::npos,
        "dtype mismatch message: " + msg.substr(0, 200));
}

}  // namespace

int main() {
  test_forward_backward_fp64();
  test_dropout_mask_and_branch();
  test_merge_roundtrip_and_dispatcher();
  test_errors_name_the_tensor();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
