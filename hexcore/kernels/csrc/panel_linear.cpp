// The C++ of hexcore/kernels/panel_linear.py (its docstring describes the loop), compiled for the host CPU on
// first use by hexcore/kernels/build.py with torch's load_inline, which also writes the Python
// bindings of packed_linear: there is no PYBIND11_MODULE here.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>

typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));  // 8 floats, any alignment
typedef int32_t int32x8 __attribute__((vector_size(32), aligned(2), may_alias));  // 16 bfloat16s, paired
static constexpr int64_t kPanelWidth = 16;
static constexpr int kTileRows = 6;                  // 6 x 2 accumulators + 2 weight vectors fit 16 registers
static constexpr int64_t kRowBlockBytes = 1 << 18;   // rows of x handled per pass: they stay in L2
static constexpr int64_t kMultiplyAddsPerTask = 1 << 15;

// A panel row's 16 entries as two vectors of 8 floats: float32 as they are; bfloat16 widened exactly (a
// bfloat16 is a float's top half), stored paired (columns c and c + 8 in one 32-bit lane, see
// panel_linear.py) so that one load, a shift and a mask give both vectors.
static inline void load16(const float* p, vec8& w0, vec8& w1) {
  w0 = *reinterpret_cast<const vec8*>(p);
  w1 = *reinterpret_cast<const vec8*>(p + 8);
}
static inline void load16(const at::BFloat16* p, vec8& w0, vec8& w1) {
  const int32x8 pairs = *reinterpret_cast<const int32x8*>(p);
  w0 = reinterpret_cast<vec8>(pairs << 16);
  w1 = reinterpret_cast<vec8>(pairs & int32_t(0xFFFF0000u));
}

// out[0:ROWS, 0:num_cols] = x[0:ROWS, :] @ panel (x rows K apart, out rows N apart), while the next
// panel (if any) is fetched into cache: its k-th 16 entries while this panel's are read.
template <int ROWS, typename W>
static inline void tile(const float* x, int64_t K, const W* panel, float* out, int64_t N, int64_t num_cols,
                        const W* next_panel) {
  vec8 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = vec8{};
  for (int64_t k = 0; k < K; ++k) {
    vec8 w0, w1;
    load16(panel + k * kPanelWidth, w0, w1);
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
template <typename W>
static void panel_rows(const float* x, int64_t num_rows, int64_t K, const W* panel, float* out, int64_t N,
                       int64_t num_cols, const W* next_panel) {
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

template <typename W>
static void run_panels(const float* x_ptr, int64_t M, int64_t K, const W* w_ptr, int64_t num_panels, float* out_ptr,
                       int64_t N) {
  const int64_t block_rows = std::max<int64_t>(kTileRows, kRowBlockBytes / (K * 4) / kTileRows * kTileRows);
  const int64_t panels_per_task = std::max<int64_t>(1, kMultiplyAddsPerTask / std::max<int64_t>(1, M * K * kPanelWidth));
  at::parallel_for(0, num_panels, panels_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += block_rows) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kPanelWidth;
        const W* panel = w_ptr + p * K * kPanelWidth;
        panel_rows(x_ptr + m0 * K, std::min(block_rows, M - m0), K, panel, out_ptr + m0 * N + n0, N,
                   std::min(kPanelWidth, N - n0), p + 1 < end ? panel + K * kPanelWidth : nullptr);
      }
    }
  });
}

// input [..., K] float32, packed [P, K, 16] float32 or bfloat16 -> float32 [..., out_features]
torch::Tensor packed_linear(torch::Tensor input, torch::Tensor packed, int64_t out_features) {
  TORCH_CHECK(input.device().is_cpu() && packed.device().is_cpu() && input.dtype() == torch::kFloat32 &&
              (packed.dtype() == torch::kFloat32 || packed.dtype() == torch::kBFloat16),
              "float32 CPU input, float32 or bfloat16 CPU panels only");
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
  if (packed.dtype() == torch::kFloat32)
    run_panels(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), num_panels, out.data_ptr<float>(), N);
  else
    run_panels(x.data_ptr<float>(), M, K, packed.data_ptr<at::BFloat16>(), num_panels, out.data_ptr<float>(), N);
  auto sizes = input.sizes().vec();
  sizes.back() = N;
  return out.view(sizes);
}
