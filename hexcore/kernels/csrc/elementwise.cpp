// The C++ of hexcore/kernels/elementwise.py (its docstring describes the loop), compiled for the host CPU on
// first use by hexcore/kernels/build.py with torch's load_inline, which also writes the Python
// bindings of rms_norm and silu_and_mul: there is no PYBIND11_MODULE here.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

static constexpr int64_t kElementsPerTask = 1 << 15;  // fewer and a wake-up costs more than it saves

// x [..., C] as contiguous rows [T, C] (a copy only if x is not contiguous).
static torch::Tensor as_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == torch::kFloat32, "float32 CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rows of at least one column");
  return x.contiguous().view({-1, x.size(-1)});
}

// x [..., C] -> weight * x / sqrt(mean(x^2) + eps), row by row.
torch::Tensor rms_norm(torch::Tensor input, torch::Tensor weight, double eps) {
  auto x = as_rows(input);
  const int64_t num_rows = x.size(0), num_cols = x.size(1);
  TORCH_CHECK(weight.device().is_cpu() && weight.dtype() == torch::kFloat32 && weight.is_contiguous() &&
              weight.numel() == num_cols, "one contiguous float32 weight per column");
  auto out = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, num_rows, std::max<int64_t>(1, kElementsPerTask / num_cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * num_cols;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < num_cols; ++c) squares += row[c] * row[c];
      const float inverse_rms = 1.0f / std::sqrt(squares / num_cols + epsilon);
      float* out_row = o + r * num_cols;
#pragma omp simd
      for (int64_t c = 0; c < num_cols; ++c) out_row[c] = w[c] * (row[c] * inverse_rms);
    }
  });
  return out.view(input.sizes());
}

// gate_up [..., 2I] (gate columns, then up columns) -> silu(gate) * up [..., I].
torch::Tensor silu_and_mul(torch::Tensor input) {
  auto gate_up = as_rows(input);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate and up halves of equal width");
  const int64_t num_rows = gate_up.size(0), width = gate_up.size(1) / 2;
  auto out = torch::empty({num_rows, width}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, num_rows, std::max<int64_t>(1, kElementsPerTask / width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = in + r * 2 * width;
      const float* up = gate + width;
      float* out_row = o + r * width;
      // exp's argument is capped: past ~88 it overflows, and fast-math's reciprocal of inf is NaN,
      // where silu is ~0 (at -80 the result is already below 1e-33 of the gate)
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) out_row[c] = gate[c] / (1.0f + std::exp(std::min(-gate[c], 80.0f))) * up[c];
    }
  });
  auto sizes = input.sizes().vec();
  sizes.back() = width;
  return out.view(sizes);
}
