"""Paged attention: the CPU decode kernel (reads the cache in place) and the torch path (gather + SDPA)
against a plain reference, on a block layout handed out in a shuffled order."""

import os

import pytest
import torch

from hexcore.kernels import paged_attention as decode_kernel_module
from hexcore.model.attention import AttentionMetadata, paged_attention
from hexcore.kernels.build import CppExtension

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
    h // (H / Hkv), as HF's repeat_kv does)."""
    k_cache, v_cache, out, row = k_cache.clone(), v_cache.clone(), [], 0
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
        row += num_new
    return torch.cat(out)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [1, 5, 1, 3]])  # all decoding; decodes beside prompt chunks
@pytest.mark.parametrize("head_dim", [16, 64])  # the kernel's generic loop, and one unrolled for 64
@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch path", "cpu kernel"])
def test_paged_attention_matches_a_plain_reference(kernel, num_heads, num_kv_heads, query_lens, head_dim, use_kernel):
    context_lens = [1, 9, 16, 23]  # within one block, across blocks, a full last block, a partial one
    q, k, v, k_cache, v_cache, tables = _step(num_heads, num_kv_heads, context_lens, query_lens, head_dim)
    scale = head_dim**-0.5
    expected = _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, torch.device("cpu"),
                                   decode_kernel=kernel if use_kernel else None)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
    expected = _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale=64**-0.5)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, torch.device("cpu"),
                                   decode_kernel=kernel)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale=64**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_kernel_with_the_engine_block_size_and_a_128_head_dim(kernel):
    """Block size 16 (the engine's default) and the other head dim the kernel unrolls."""
    context_lens, query_lens = [1, 16, 17, 40], [1, 1, 1, 1]
    q, k, v, k_cache, v_cache, tables = _step(9, 3, context_lens, query_lens, head_dim=128, block_size=16)
    expected = _reference(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale=128**-0.5)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, 16, torch.device("cpu"), decode_kernel=kernel)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale=128**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
