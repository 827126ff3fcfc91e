// The C++ of hexcore/kernels/paged_attention.py (its docstring describes the loop), compiled for the host CPU on
// first use by hexcore/kernels/build.py with torch's load_inline, which also writes the Python
// bindings of paged_decode_attention: there is no PYBIND11_MODULE here.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// Built with -ffast-math (hexcore/kernels/build.py): no infinities or NaNs are relied on below.

static void check_inputs(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                         const torch::Tensor& block_tables, const torch::Tensor& context_lens) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
              block_tables.device().is_cpu() && context_lens.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 && v_cache.dtype() == torch::kFloat32,
              "float32 only");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes(), "the caches must be contiguous [blocks, block_size, Hkv, D], alike");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && block_tables.is_contiguous() && block_tables.dim() == 2,
              "block_tables must be a contiguous int64 [B, max_blocks]");
  TORCH_CHECK(context_lens.dtype() == torch::kInt64 && context_lens.is_contiguous(), "context_lens must be int64");
  TORCH_CHECK(q.dim() == 3 && q.size(0) == block_tables.size(0) && context_lens.numel() == q.size(0),
              "one block table and one length per sequence");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "query and key head dims differ");
  const int64_t max_len = block_tables.size(1) * k_cache.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < context_lens.numel(); ++i)
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_len, "context lengths must lie in [1, block table capacity]");
  const int64_t* blocks = block_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < block_tables.numel(); ++i)
    TORCH_CHECK(blocks[i] >= 0 && blocks[i] < k_cache.size(0), "block ids must lie in the cache");
}

static inline void prefetch_row(const float* row, int64_t num_floats) {
  for (int64_t i = 0; i < num_floats; i += 64 / sizeof(float)) __builtin_prefetch(row + i);
}

// One sequence, every head: out[h] = sum over t of softmax_t(q[h] . k[t] * scale) v[t], where query head
// h reads KV head h / (H / Hkv). Block by block with a running softmax (max and sum per head), so keys and
// values are read once, in place, while the next block is prefetched. kHeadDim: the head dim when known
// at compile time (the common sizes, fully unrolled), or 0 to read it from `head_dim`.
template <int64_t kHeadDim>
static void attend_sequence(const float* q, const float* k_cache, const float* v_cache, const int64_t* table,
                            int64_t len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, float* scratch, float* out) {
  const int64_t D = kHeadDim ? kHeadDim : head_dim;
  const int64_t row_size = num_kv_heads * D, block_floats = block_size * row_size;
  const int64_t group = num_heads / num_kv_heads;
  float* scores = scratch;                           // [H, block_size]
  float* acc = scores + num_heads * block_size;      // [H, D]
  float* running_max = acc + num_heads * D;          // [H]
  float* running_sum = running_max + num_heads;      // [H]
  std::fill(acc, acc + num_heads * D, 0.0f);
  std::fill(running_sum, running_sum + num_heads, 0.0f);
  for (int64_t start = 0, b = 0; start < len; start += block_size, ++b) {
    const int64_t n = std::min(block_size, len - start);
    const float* keys = k_cache + table[b] * block_floats;  // token t's row (all KV heads): + t * row_size
    const float* values = v_cache + table[b] * block_floats;
    const bool has_next = start + block_size < len;
    const float* next_keys = has_next ? k_cache + table[b + 1] * block_floats : nullptr;
    const float* next_values = has_next ? v_cache + table[b + 1] * block_floats : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      const float* key = keys + t * row_size;
      if (has_next) prefetch_row(next_keys + t * row_size, row_size);
      for (int64_t h = 0; h < num_heads; ++h) {
        const float* query = q + h * D;
        const float* key_h = key + (h / group) * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += query[d] * key_h[d];
        scores[h * block_size + t] = dot * scale;
      }
    }
    for (int64_t h = 0; h < num_heads; ++h) {  // scores -> weights exp(s - max); rescale what came before
      float* s = scores + h * block_size;
      const float block_max = *std::max_element(s, s + n);
      const float new_max = start == 0 ? block_max : std::max(running_max[h], block_max);
      if (start > 0 && new_max > running_max[h]) {
        const float correction = std::exp(running_max[h] - new_max);
        running_sum[h] *= correction;
        for (int64_t d = 0; d < D; ++d) acc[h * D + d] *= correction;
      }
      running_max[h] = new_max;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - new_max);
        sum += s[t];
      }
      running_sum[h] += sum;
    }
    for (int64_t t = 0; t < n; ++t) {
      const float* value = values + t * row_size;
      if (has_next) prefetch_row(next_values + t * row_size, row_size);
      for (int64_t h = 0; h < num_heads; ++h) {
        const float weight = scores[h * block_size + t];
        const float* value_h = value + (h / group) * D;
        float* a = acc + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += weight * value_h[d];
      }
    }
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    const float inverse_sum = 1.0f / running_sum[h];
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inverse_sum;
  }
}

// q [B, H, D] -> [B, H, D]; sequence b's keys and values: blocks block_tables[b], its first context_lens[b] tokens.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  auto queries = q.contiguous();
  check_inputs(queries, k_cache, v_cache, block_tables, context_lens);
  const int64_t num_heads = queries.size(1), head_dim = queries.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2), max_blocks = block_tables.size(1);
  auto out = torch::empty_like(queries);
  const float* q_ptr = queries.data_ptr<float>();
  const float* k_ptr = k_cache.data_ptr<float>();
  const float* v_ptr = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);
  auto attend = head_dim == 64 ? attend_sequence<64> : head_dim == 128 ? attend_sequence<128> : attend_sequence<0>;
  at::parallel_for(0, queries.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(num_heads * (block_size + head_dim + 2));
    for (int64_t seq = begin; seq < end; ++seq)
      attend(q_ptr + seq * num_heads * head_dim, k_ptr, v_ptr, tables + seq * max_blocks, lens[seq], num_heads,
             num_kv_heads, head_dim, block_size, softmax_scale, scratch.data(), out_ptr + seq * num_heads * head_dim);
  });
  return out;
}
