"""Paged attention: the CPU decode kernel (reads the cache in place) against the torch path (gather +
SDPA), on a block layout handed out in a shuffled order."""

import pytest
import torch

from hexcore import cpu_attention
from hexcore.attention import AttentionMetadata, paged_attention

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def kernel():
    kernel = cpu_attention.load()
    assert kernel is not None, "the CPU decode-attention kernel must build here (a C++ compiler and ninja)"
    return kernel


def _step(num_heads: int, num_kv_heads: int, context_lens: list[int], query_lens: list[int]):
    generator = torch.Generator().manual_seed(7)
    head_dim, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=generator)
    free = torch.randperm(num_blocks - 1, generator=generator).add(1).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in context_lens]
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    return q, k, v, k_cache, v_cache, tables


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [1, 5, 1, 3]])  # all decoding; decodes beside prompt chunks
def test_decode_kernel_matches_the_torch_path(kernel, num_heads, num_kv_heads, query_lens):
    context_lens = [1, 9, 16, 23]
    outputs = []
    for decode_kernel in (None, kernel):
        q, k, v, k_cache, v_cache, tables = _step(num_heads, num_kv_heads, context_lens, query_lens)
        meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, torch.device("cpu"),
                                       decode_kernel=decode_kernel)
        outputs.append(paged_attention(q, k, v, k_cache, v_cache, meta, scale=16**-0.5))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_stage_runners_on_cpu_get_the_kernel():
    from hexcore.devices import decode_attention_kernel

    assert decode_attention_kernel(torch.device("cpu"), torch.float32) is cpu_attention.paged_decode_attention
    assert decode_attention_kernel(torch.device("cpu"), torch.bfloat16) is None  # the torch path
