"""Paged attention: the CPU decode kernel (reads the cache in place) and the torch path (gather + SDPA)
against a plain reference, on a block layout handed out in a shuffled order."""

import os

import pytest
import torch

from hexcore.kernels import paged_attention as decode_kernel_module
from hexcore.model.attention import AttentionMetadata, paged_attention
from hexcore.kernels.build import CppExtension
from tests.hexcore.kernels.tolerance import EPS32, assert_within, reduction_tolerance

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def kernel():
    kernel = decode_kernel_module.load()
    assert kernel is not None, "the CPU decode-attention kernel must build here (a C++ compiler and ninja)"
    return kernel


def _step(num_heads: int, num_kv_heads: int, context_lens: list[int], query_lens: list[int], head_dim: int = 16,
          block_size: int = BLOCK_SIZE):
    generator = torch.Generator().manual_seed(7)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    free = torch.randperm(num_blocks - 1, generator=generator).add(1).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in context_lens]
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    return q, k, v, k_cache, v_cache, tables


def _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale):
    """Each sequence on its own: write its new keys and values into a copy of the cache, read its
    keys back block by block, and attend causally with an explicit softmax (query head h reads KV head
    h // (H / Hkv), as HF's repeat_kv does). Returns the output and how far from it a float32
    computation in another order may be (_attention_tolerance)."""
    k_cache, v_cache, out, tolerance, row = k_cache.clone(), v_cache.clone(), [], [], 0
    group, block_size = q.shape[1] // k.shape[1], k_cache.shape[1]
    for num_new, length, table in zip(query_lens, context_lens, tables):
        for i, position in enumerate(range(length - num_new, length)):
            k_cache[table[position // block_size], position % block_size] = k[row + i]
            v_cache[table[position // block_size], position % block_size] = v[row + i]
        keys = torch.cat([k_cache[b] for b in table])[:length].repeat_interleave(group, dim=1)  # [L, H, D]
        values = torch.cat([v_cache[b] for b in table])[:length].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[row : row + num_new], keys) * scale
        causal = torch.arange(length)[None, :] <= torch.arange(length - num_new, length)[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, values))
        tolerance.append(_attention_tolerance(q[row : row + num_new], keys, values, scores, probs, causal, scale))
        row += num_new
    return torch.cat(out), torch.cat(tolerance)


def _attention_tolerance(q, keys, values, scores, probs, causal, scale):
    """Elementwise bound [q, H, D] on how far two float32 computations of out = softmax(q k^T * scale) v
    that sum in different orders (a running softmax block by block, SDPA, this reference) may differ:

    - each score sums D products of random sign: off by at most
      ds = reduction_tolerance(D, scale * sqrt(sum_d q_d^2 k_d^2)), plus a few eps of |score|
      (the scaling, and subtracting the max);
    - d out / d s_t = p_t (v_t - out), so scores off by at most ds move the output by at most
      2 ds * sum_t p_t |v_t - out| (small where the weights are on one key, however large the scores);
    - the output's sum over the L keys and the softmax's sum of L positive weights each reorder:
      reduction_tolerance(L, A) and reduction_tolerance(L, 1) * A, where A = sum_t p_t |v_t| (>= |out|;
      for terms of any sign reduction_tolerance's scale is the sum of their magnitudes), and exp and
      the division round a few eps of A."""
    head_dim, num_keys = q.shape[-1], keys.shape[0]
    out = torch.einsum("hqk,khd->qhd", probs, values)
    score_scale = torch.einsum("qhd,khd->hqk", q.square(), keys.square()).sqrt() * scale
    score_error = reduction_tolerance(head_dim, score_scale) + 4 * EPS32 * scores.abs()
    max_score_error = score_error.masked_fill(~causal, 0).amax(dim=-1).T[..., None]  # [q, H, 1]: keys it sees
    spread = torch.einsum("hqk,qkhd->qhd", probs, (values[None] - out[:, None]).abs())  # sum_t p_t |v_t - out|
    output_scale = torch.einsum("hqk,khd->qhd", probs, values.abs())  # A
    return 2 * max_score_error * spread + output_scale * (2 * reduction_tolerance(num_keys, 1.0) + 8 * EPS32)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [1, 5, 1, 3]])  # all decoding; decodes beside prompt chunks
@pytest.mark.parametrize("head_dim", [16, 64])  # the kernel's generic loop, and one unrolled for 64
@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch path", "cpu kernel"])
def test_paged_attention_matches_a_plain_reference(kernel, num_heads, num_kv_heads, query_lens, head_dim, use_kernel):
    context_lens = [1, 9, 16, 23]  # within one block, across blocks, a full last block, a partial one
    q, k, v, k_cache, v_cache, tables = _step(num_heads, num_kv_heads, context_lens, query_lens, head_dim)
    scale = head_dim**-0.5
    expected, tolerance = _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, torch.device("cpu"),
                                   decode_kernel=kernel if use_kernel else None)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    assert_within(got, expected, tolerance)


def test_kernel_rejects_a_block_table_beyond_the_cache(kernel):
    q, k, v, k_cache, v_cache, tables = _step(4, 2, [9], [1])
    bad_table = torch.tensor([[0, 1, k_cache.shape[0]]])
    with pytest.raises(RuntimeError, match="block ids must lie in the cache"):
        kernel(q, k_cache, v_cache, bad_table, torch.tensor([9]), 0.25)


def test_stage_runners_on_cpu_get_the_kernel():
    from hexcore.kernels.select import decode_attention_kernel

    assert decode_attention_kernel(torch.device("cpu"), torch.float32) is decode_kernel_module.paged_decode_attention
    assert decode_attention_kernel(torch.device("cpu"), torch.bfloat16) is None  # the torch path


def test_without_a_compiler_the_torch_path_serves(monkeypatch):
    from hexcore.kernels.select import decode_attention_kernel

    def no_compiler():
        raise OSError("no C++ compiler")

    extension = decode_kernel_module._EXTENSION
    unbuildable = CppExtension(extension.prefix, extension.source_file, extension.functions, extension.description)
    monkeypatch.setattr(unbuildable, "_build", no_compiler)
    monkeypatch.setattr(decode_kernel_module, "_EXTENSION", unbuildable)
    assert decode_attention_kernel(torch.device("cpu"), torch.float32) is None


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_process(kernel, tmp_path):
    import subprocess
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    build_dir = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(),
                             decode_kernel_module._EXTENSION.build_name)
    open(os.path.join(build_dir, "lock"), "w").close()  # what a build killed by SIGKILL leaves
    code = "from hexcore.kernels import paged_attention; assert paged_attention.load() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_kernel_is_stable_for_large_scores(kernel):
    """Scores in the hundreds overflow a naive exp; the running max keeps every weight finite."""
    context_lens, query_lens = [23, 7], [1, 1]
    q, k, v, k_cache, v_cache, tables = _step(6, 2, context_lens, query_lens, head_dim=64)
    q = q * 100
    expected, tolerance = _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale=64**-0.5)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, torch.device("cpu"),
                                   decode_kernel=kernel)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale=64**-0.5)
    assert_within(got, expected, tolerance)  # the scores' tolerance grows with q, as their rounding does


def test_kernel_with_the_engine_block_size_and_a_128_head_dim(kernel):
    """Block size 16 (the engine's default) and the other head dim the kernel unrolls."""
    context_lens, query_lens = [1, 16, 17, 40], [1, 1, 1, 1]
    q, k, v, k_cache, v_cache, tables = _step(9, 3, context_lens, query_lens, head_dim=128, block_size=16)
    expected, tolerance = _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale=128**-0.5)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, 16, torch.device("cpu"), decode_kernel=kernel)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale=128**-0.5)
    assert_within(got, expected, tolerance)
