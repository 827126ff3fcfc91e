// The C++ of hexcore/kernels/fused_layer.py (its docstring describes the two calls). build.py compiles it after
// panel_linear.cpp, elementwise.cpp and paged_attention.cpp, whose functions it calls directly; torch's
// load_inline writes the Python bindings of attention_block and mlp_block: there is no PYBIND11_MODULE here.
#include <torch/extension.h>
#include <cstring>

// out = x rotated by position, HF's x * cos + rotate_half(x) * sin, with rotate_half's sign in signed_sin's
// first half (hexcore/model/llama.py RopeSpec.tables): out[i] = x[i] cos[i] + x[(i + D/2) mod D] signed_sin[i].
static inline void rotate(const float* x, const float* cos, const float* signed_sin, int64_t D, float* out) {
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * signed_sin[i];
#pragma omp simd
  for (int64_t i = half; i < D; ++i) out[i] = x[i] * cos[i] + x[i - half] * signed_sin[i];
}

// qkv [T, (H + 2 Hkv) D] -> rotated queries [T, H, D]; token t's rotated keys and its values are written
// to cache slot slot_mapping[t] (block slot / block_size, row slot % block_size).
static torch::Tensor rope_and_cache(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                                    const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                    const torch::Tensor& slot_mapping, int64_t num_heads) {
  const int64_t T = qkv.size(0), num_kv_heads = k_cache.size(2), D = k_cache.size(3);
  const int64_t row_width = (num_heads + 2 * num_kv_heads) * D, cache_row = num_kv_heads * D;
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == row_width, "qkv must be [T, (H + 2 Hkv) D]");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && signed_sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
              signed_sin.is_contiguous() && cos.sizes() == signed_sin.sizes() && cos.dim() == 2 &&
              cos.size(0) == T && cos.size(1) == D, "cos and signed_sin must be contiguous float32 [T, D]");
  TORCH_CHECK(slot_mapping.dtype() == torch::kInt64 && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "slot_mapping must be a contiguous int64 [T]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "cache slots must lie in the cache");
  auto q = torch::empty({T, num_heads, D}, qkv.options());
  const float* in = qkv.data_ptr<float>();
  const float* cos_ptr = cos.data_ptr<float>();
  const float* sin_ptr = signed_sin.data_ptr<float>();
  float* q_ptr = q.data_ptr<float>();
  float* k_ptr = k_cache.data_ptr<float>();
  float* v_ptr = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* row = in + t * row_width;
    const float* c = cos_ptr + t * D;
    const float* s = sin_ptr + t * D;
    for (int64_t h = 0; h < num_heads; ++h) rotate(row + h * D, c, s, D, q_ptr + (t * num_heads + h) * D);
    float* key_row = k_ptr + slots[t] * cache_row;
    for (int64_t h = 0; h < num_kv_heads; ++h) rotate(row + (num_heads + h) * D, c, s, D, key_row + h * D);
    std::memcpy(v_ptr + slots[t] * cache_row, row + (num_heads + num_kv_heads) * D, cache_row * sizeof(float));
  }
  return q;
}

// x [B, C], one new token per sequence -> o_proj(attention(rope(qkv_proj(rms_norm(x))))) [B, C], this rank's
// part (before the tensor-parallel all-reduce), the new keys and values written to the cache on the way.
torch::Tensor attention_block(torch::Tensor x, torch::Tensor norm_weight, double eps, torch::Tensor qkv_panels,
                              torch::Tensor o_panels, torch::Tensor cos, torch::Tensor signed_sin,
                              torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                              torch::Tensor block_tables, torch::Tensor context_lens, int64_t num_heads, double scale) {
  TORCH_CHECK(x.dim() == 2 && k_cache.dim() == 4, "x must be [B, C], the caches [blocks, block_size, Hkv, D]");
  const int64_t num_kv_heads = k_cache.size(2), D = k_cache.size(3);
  auto qkv = packed_linear(rms_norm(x, norm_weight, eps), qkv_panels, (num_heads + 2 * num_kv_heads) * D);
  auto q = rope_and_cache(qkv, cos, signed_sin, k_cache, v_cache, slot_mapping, num_heads);
  auto attended = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale);
  return packed_linear(attended.view({x.size(0), num_heads * D}), o_panels, x.size(1));
}

// x [T, C] -> down(silu(gate(rms_norm(x))) * up(rms_norm(x))) [T, C], this rank's part (before the all-reduce).
torch::Tensor mlp_block(torch::Tensor x, torch::Tensor norm_weight, double eps, torch::Tensor gate_up_panels,
                        torch::Tensor down_panels) {
  TORCH_CHECK(x.dim() == 2 && down_panels.dim() == 3, "x must be [T, C], the panels [P, K, 16]");
  auto gate_up = packed_linear(rms_norm(x, norm_weight, eps), gate_up_panels, 2 * down_panels.size(1));
  return packed_linear(silu_and_mul(gate_up), down_panels, x.size(1));
}
