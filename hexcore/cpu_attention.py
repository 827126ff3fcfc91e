"""Decode attention over the paged KV cache on CPU without copying the cache, compiled on first use.

The torch path (hexcore/attention.py) copies every decoding sequence's keys and values out of their
blocks into one padded batch before SDPA reads them again. Here two small C++ loops read each cached
token's row (all its KV heads, contiguous in the block) once, in place:

    scores [B, H, L] = q . k * scale         (keys of sequence b: blocks block_tables[b]; -inf past its length)
    probs = softmax(scores)                   (torch)
    out [B, H, D] = sum over t of probs * v

Query head h reads KV head h // (H / Hkv). The loops run on torch's own thread pool
(at::parallel_for over sequences), so a worker's thread budget holds. They are built with torch's
C++ extension loader (a C++ compiler and ninja) into torch's extension cache the first time a
process asks; `load()` returns None, logged once, where they cannot be built.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <limits>

// The shapes both loops rely on; a violation raises (RuntimeError in Python) instead of reading astray.
static void check_inputs(const torch::Tensor& rows, const torch::Tensor& cache, const torch::Tensor& block_tables,
                         const torch::Tensor& context_lens, int64_t max_len, bool check_ranges) {
  TORCH_CHECK(rows.device().is_cpu() && cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(rows.dtype() == torch::kFloat32 && cache.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), "the cache must be a contiguous [blocks, block_size, Hkv, D]");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && block_tables.is_contiguous() && block_tables.dim() == 2,
              "block_tables must be a contiguous int64 [B, max_blocks]");
  TORCH_CHECK(context_lens.dtype() == torch::kInt64 && context_lens.is_contiguous(), "context_lens must be int64");
  TORCH_CHECK(rows.dim() == 3 && rows.size(0) == block_tables.size(0) && context_lens.numel() == rows.size(0),
              "one block table and one length per sequence");
  TORCH_CHECK(rows.size(1) % cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(max_len <= block_tables.size(1) * cache.size(1), "max_len beyond the block tables");
  if (!check_ranges) return;  // the tables are read once per attention, in paged_scores
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < context_lens.numel(); ++i)
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_len, "context lengths must lie in [1, max_len]");
  const int64_t* blocks = block_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < block_tables.numel(); ++i)
    TORCH_CHECK(blocks[i] >= 0 && blocks[i] < cache.size(0), "block ids must lie in the cache");
}

// Calls visit(seq, t, h, cached) for every sequence (in parallel, on torch's pool), every cached token
// t < its length (in order) and every query head h, where `cached` points at the D floats of the
// token's row (all Hkv heads, contiguous in its block: [num_blocks, block_size, Hkv, D]) that head h
// reads: KV head h / (H / Hkv).
template <typename Visit>
static void for_each_cached_token(const torch::Tensor& cache, const torch::Tensor& block_tables,
                                  const torch::Tensor& context_lens, int64_t num_heads, const Visit& visit) {
  const int64_t block_size = cache.size(1), num_kv_heads = cache.size(2), head_dim = cache.size(3);
  const int64_t row_size = num_kv_heads * head_dim, group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const float* base = cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  at::parallel_for(0, block_tables.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t* table = tables + seq * max_blocks;
      for (int64_t t = 0; t < lens[seq]; ++t) {
        const float* row = base + (table[t / block_size] * block_size + t % block_size) * row_size;
        for (int64_t h = 0; h < num_heads; ++h) visit(seq, t, h, row + (h / group) * head_dim);
      }
    }
  });
}

// q [B, H, D] -> scores [B, H, max_len]: q . k * scale for the sequence's keys, -inf past its length.
torch::Tensor paged_scores(torch::Tensor q, torch::Tensor k_cache, torch::Tensor block_tables,
                           torch::Tensor context_lens, int64_t max_len, double scale) {
  auto queries = q.contiguous();
  check_inputs(queries, k_cache, block_tables, context_lens, max_len, true);
  TORCH_CHECK(queries.size(2) == k_cache.size(3), "query and key head dims differ");
  const int64_t num_heads = queries.size(1), head_dim = queries.size(2);
  auto scores = torch::full({queries.size(0), num_heads, max_len}, -std::numeric_limits<float>::infinity(),
                            queries.options());
  const float* q_ptr = queries.data_ptr<float>();
  float* out = scores.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);
  for_each_cached_token(k_cache, block_tables, context_lens, num_heads,
                        [=](int64_t seq, int64_t t, int64_t h, const float* key) {
    const float* query = q_ptr + (seq * num_heads + h) * head_dim;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < head_dim; ++d) dot += query[d] * key[d];
    out[(seq * num_heads + h) * max_len + t] = dot * softmax_scale;
  });
  return scores;
}

// probs [B, H, max_len] -> out [B, H, D]: the probability-weighted sum of the sequence's values.
torch::Tensor paged_weighted_values(torch::Tensor probs, torch::Tensor v_cache, torch::Tensor block_tables,
                                    torch::Tensor context_lens) {
  check_inputs(probs, v_cache, block_tables, context_lens, probs.size(2), false);
  TORCH_CHECK(probs.is_contiguous(), "probs must be contiguous");
  const int64_t num_heads = probs.size(1), max_len = probs.size(2), head_dim = v_cache.size(3);
  auto values = torch::zeros({probs.size(0), num_heads, head_dim}, probs.options());
  const float* p_ptr = probs.data_ptr<float>();
  float* out = values.data_ptr<float>();
  for_each_cached_token(v_cache, block_tables, context_lens, num_heads,
                        [=](int64_t seq, int64_t t, int64_t h, const float* value) {
    const float weight = p_ptr[(seq * num_heads + h) * max_len + t];
    float* acc = out + (seq * num_heads + h) * head_dim;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) acc[d] += weight * value[d];
  });
  return values;
}
"""


def _build_name() -> str:
    """The build is tuned to this CPU (-march=native): its name carries the CPU's feature flags, so a
    cache shared by machines of different CPUs never hands one the other's build."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return "hexgen_paged_decode_attention_" + hashlib.sha1(flags.encode()).hexdigest()[:10]


_lock = threading.Lock()
_module = None
_is_loaded = False


def _load_module():
    global _module, _is_loaded
    with _lock:
        if not _is_loaded:
            _is_loaded = True
            try:
                _module = _build()
            except Exception as err:  # no compiler or ninja: the torch path serves instead
                log.warning("CPU decode-attention kernel unavailable (%s); using the torch path", err)
    return _module


def _build():
    """Build (or load the earlier build of) the loops. Processes take turns under an flock, which the
    OS releases when its holder dies; the holder first removes a lock file that torch's own builder
    left behind in a process killed mid-build (torch would otherwise wait for it forever)."""
    import ninja  # the build tool torch's loader runs: the pip package's binary, if not on PATH
    from torch.utils.cpp_extension import get_default_build_root, load_inline

    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    name = _build_name()
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{name}.flock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return load_inline(name=name, cpp_sources=_SOURCE, functions=["paged_scores", "paged_weighted_values"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           build_directory=str(build_dir))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] float32 over the cache's blocks (block_tables [B, max_blocks], context_lens [B])
    -> [B, H, D]."""
    module = _module
    max_len = block_tables.shape[1] * k_cache.shape[1]
    with torch.profiler.record_function("hexcore::paged_decode_attention"):  # the loops are no torch ops
        scores = module.paged_scores(q, k_cache, block_tables, context_lens, max_len, scale)  # [B, H, L]
        probs = torch.softmax(scores, dim=-1)
        return module.paged_weighted_values(probs, v_cache, block_tables, context_lens)


def load():
    """`paged_decode_attention`, once its loops are built (on the first call in any process of this
    machine; later calls and processes reuse the build), or None where they cannot be built."""
    return paged_decode_attention if _load_module() is not None else None
