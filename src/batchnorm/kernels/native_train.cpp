// Training-mode batch norm of a small (N, C) input on ATen's kernel with the non-finite guard in
// the same native call (see batchnorm/kernels/native.py, which builds and loads this file).
//
// train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps) -> (y, accepted):
// keeps the running statistics, runs at::native_batch_norm (which moves them and records its own
// autograd node), and puts the kept values back when the moved ones are not all finite: a batch
// whose statistics are NaN or infinite (a NaN or infinite value, or a sum that overflows) leaves
// them as they were and returns accepted = false. num_batches_tracked (optional) counts accepted
// batches. The caller has checked that the running statistics are C values in x's dtype (float32
// or float64) that do not require grad.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kOnStack = 1024;  // channels kept without a heap allocation

template <typename T>
bool all_finite(const T* p, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(p[i]);
  return ok;
}

// Contiguous buffers: the values are kept and put back through their addresses.
template <typename T>
std::tuple<at::Tensor, bool> train_contiguous(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& bias, at::Tensor& mean,
                                              at::Tensor& var, double momentum, double eps) {
  const int64_t c = mean.numel();
  T* m = mean.data_ptr<T>();
  T* v = var.data_ptr<T>();
  T on_stack[2 * kOnStack];
  std::vector<T> on_heap;
  T* kept = on_stack;
  if (c > kOnStack) {
    on_heap.resize(2 * c);
    kept = on_heap.data();
  }
  std::copy(m, m + c, kept);
  std::copy(v, v + c, kept + c);
  at::Tensor y = std::get<0>(at::native_batch_norm(x, weight, bias, mean, var, true, momentum, eps));
  if (all_finite(m, c) && all_finite(v, c)) return {y, true};
  std::copy(kept, kept + c, m);
  std::copy(kept + c, kept + 2 * c, v);
  return {y, false};
}

}  // namespace

std::tuple<at::Tensor, bool> train(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, at::Tensor running_mean,
                                   at::Tensor running_var, const std::optional<at::Tensor>& num_batches_tracked,
                                   double momentum, double eps) {
  std::tuple<at::Tensor, bool> out;
  if (running_mean.is_contiguous() && running_var.is_contiguous() &&
      running_mean.scalar_type() == running_var.scalar_type()) {
    if (running_mean.scalar_type() == at::kFloat) {
      out = train_contiguous<float>(x, weight, bias, running_mean, running_var, momentum, eps);
    } else if (running_mean.scalar_type() == at::kDouble) {
      out = train_contiguous<double>(x, weight, bias, running_mean, running_var, momentum, eps);
    } else {
      TORCH_CHECK(false, "batchnorm native train: float32 or float64 running statistics expected, got ",
                  running_mean.scalar_type());
    }
  } else {  // strided buffers (rare): kept and put back as tensors
    at::Tensor mean_kept = running_mean.clone(), var_kept = running_var.clone();
    at::Tensor y = std::get<0>(at::native_batch_norm(x, weight, bias, running_mean, running_var, true, momentum, eps));
    bool ok = running_mean.isfinite().all().item<bool>() && running_var.isfinite().all().item<bool>();
    if (!ok) {
      running_mean.copy_(mean_kept);
      running_var.copy_(var_kept);
    }
    out = {y, ok};
  }
  if (std::get<1>(out) && num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    num_batches_tracked->add_(1);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "training batch norm on ATen's kernel with the non-finite guard",
        py::call_guard<py::gil_scoped_release>());
}
