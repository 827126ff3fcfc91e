"""x @ W^T on CPU in float32 with the weight packed once into column panels, compiled on first use.

At decode batch sizes (a few to a few dozen rows) a linear layer reads its whole weight to do little
arithmetic with each element, and oneDNN's packed GEMM reaches 60-75% of its large-batch rate there.
This loop keeps every element's work in registers instead:

    packed [P, K, 16]   = W [N, K] cut into P = ceil(N / 16) panels of 16 output columns, each stored
                          k-major (padded with zero columns), so a panel is read front to back
    out[m0:m0+6, n0:n0+16] = sum over k of x[m0:m0+6, k] (broadcast) * packed[p, k, :]

A tile of 6 rows x 16 columns is 12 vector accumulators (8 floats each) that stay in registers over
the whole of K; each panel is read from memory once and reused for every row, and the next panel is
prefetched while it is (memory, not arithmetic, is what a few rows wait on). Panels are split over
torch's thread pool. At 16-32 rows it runs 1.4-1.7x oneDNN's packed kernel over SmolLM2's layers, and
1.2x at 512 (prefill chunks): BENCHMARKS.md, `benchmarks/bench_linear.py`. The vectors are GCC/Clang vector extensions,
which the compiler maps to the host's units (-march=native: AVX2 here, NEON on ARM).
`packed_linear()` returns None where the loop cannot be built (hexcore/kernels/build.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hexcore.kernels.build import CppExtension

PANEL_WIDTH = 16  # output columns per panel: two 8-float vectors

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>

typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));  // 8 floats, any alignment
static constexpr int64_t kPanelWidth = 16;
static constexpr int kTileRows = 6;                  // 6 x 2 accumulators + 2 weight vectors fit 16 registers
static constexpr int64_t kRowBlockBytes = 1 << 18;   // rows of x handled per pass: they stay in L2
static constexpr int64_t kMultiplyAddsPerTask = 1 << 15;

// out[0:ROWS, 0:num_cols] = x[0:ROWS, :] @ panel (x rows K apart, out rows N apart), while the next
// panel (if any) is fetched into cache: one 64-byte line per k, as fast as this panel is read.
template <int ROWS>
static inline void tile(const float* x, int64_t K, const float* panel, float* out, int64_t N, int64_t num_cols,
                        const float* next_panel) {
  vec8 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = vec8{};
  for (int64_t k = 0; k < K; ++k) {
    const vec8 w0 = *reinterpret_cast<const vec8*>(panel + k * kPanelWidth);
    const vec8 w1 = *reinterpret_cast<const vec8*>(panel + k * kPanelWidth + 8);
    if (next_panel) __builtin_prefetch(next_panel + k * kPanelWidth);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float a = x[r * K + k];
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    if (num_cols == kPanelWidth) {
      *reinterpret_cast<vec8*>(out + r * N) = acc[r][0];
      *reinterpret_cast<vec8*>(out + r * N + 8) = acc[r][1];
    } else {  // the last panel of an N that is not a multiple of 16
      float row[kPanelWidth];
      *reinterpret_cast<vec8*>(row) = acc[r][0];
      *reinterpret_cast<vec8*>(row + 8) = acc[r][1];
      std::memcpy(out + r * N, row, num_cols * sizeof(float));
    }
  }
}

// Every row of x [num_rows, K] times one panel: full tiles, then the remaining 1-5 rows. Every tile
// prefetches the next panel (measured: 10-20% faster than the first tile alone at 16-32 rows, as the
// hardware drops prefetches it cannot take yet).
static void panel_rows(const float* x, int64_t num_rows, int64_t K, const float* panel, float* out, int64_t N,
                       int64_t num_cols, const float* next_panel) {
  int64_t m = 0;
  for (; m + kTileRows <= num_rows; m += kTileRows)
    tile<kTileRows>(x + m * K, K, panel, out + m * N, N, num_cols, next_panel);
  x += m * K;
  out += m * N;
  switch (num_rows - m) {
    case 1: tile<1>(x, K, panel, out, N, num_cols, next_panel); break;
    case 2: tile<2>(x, K, panel, out, N, num_cols, next_panel); break;
    case 3: tile<3>(x, K, panel, out, N, num_cols, next_panel); break;
    case 4: tile<4>(x, K, panel, out, N, num_cols, next_panel); break;
    case 5: tile<5>(x, K, panel, out, N, num_cols, next_panel); break;
    default: break;
  }
  static_assert(kTileRows == 6, "the switch above covers the remainders of 6-row tiles");
}

// input [..., K] float32, packed [P, K, 16] -> [..., out_features]
torch::Tensor packed_linear(torch::Tensor input, torch::Tensor packed, int64_t out_features) {
  TORCH_CHECK(input.device().is_cpu() && packed.device().is_cpu() && input.dtype() == torch::kFloat32 &&
              packed.dtype() == torch::kFloat32, "float32 CPU tensors only");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kPanelWidth && packed.size(1) > 0,
              "packed must be a contiguous [panels, in_features, 16]");
  const int64_t num_panels = packed.size(0), K = packed.size(1), N = out_features;
  TORCH_CHECK(N >= 0 && N > (num_panels - 1) * kPanelWidth && N <= num_panels * kPanelWidth,
              "out_features does not match the number of panels");
  TORCH_CHECK(!input.requires_grad() && !packed.requires_grad(), "inference only: the loop records no gradient");
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == K, "input's last dimension must be the weight's in_features");
  auto x = input.contiguous().view({-1, K});
  const int64_t M = x.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = packed.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t block_rows = std::max<int64_t>(kTileRows, kRowBlockBytes / (K * 4) / kTileRows * kTileRows);
  const int64_t panels_per_task = std::max<int64_t>(1, kMultiplyAddsPerTask / std::max<int64_t>(1, M * K * kPanelWidth));
  at::parallel_for(0, num_panels, panels_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += block_rows) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kPanelWidth;
        const float* panel = w_ptr + p * K * kPanelWidth;
        panel_rows(x_ptr + m0 * K, std::min(block_rows, M - m0), K, panel, out_ptr + m0 * N + n0, N,
                   std::min(kPanelWidth, N - n0), p + 1 < end ? panel + K * kPanelWidth : nullptr);
      }
    }
  });
  auto sizes = input.sizes().vec();
  sizes.back() = N;
  return out.view(sizes);
}
"""

_EXTENSION = CppExtension("hexgen_cpu_linear", _SOURCE, ["packed_linear"], "CPU packed-panel linear loop")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panels [ceil(N / 16), K, 16]: column block p, k-major, zero-padded (one new
    tensor: the LM head is 113 MB)."""
    num_out, num_in = weight.shape
    num_full, num_rest = divmod(num_out, PANEL_WIDTH)
    packed = weight.new_zeros(num_full + bool(num_rest), num_in, PANEL_WIDTH)
    packed[:num_full] = weight[: num_full * PANEL_WIDTH].reshape(num_full, PANEL_WIDTH, num_in).transpose(1, 2)
    if num_rest:
        packed[num_full, :, :num_rest] = weight[num_full * PANEL_WIDTH:].T
    return packed


def packed_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x [..., K] -> x @ weight^T [..., N] for a float32 CPU weight [N, K], packed here once (the
    caller drops the plain weight), or None where the loop cannot be built (built on first use on
    this machine; later calls and processes reuse the build)."""
    module = _EXTENSION.module()
    if module is None or weight.numel() == 0:  # an empty weight: F.linear's zeros serve
        return None
    packed, num_out = pack(weight), weight.shape[0]
    return lambda x: module.packed_linear(x, packed, num_out)
