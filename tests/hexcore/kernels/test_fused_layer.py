"""The fused decoder-layer halves against the layer's own ops, step by step over the same sequences: the
same hidden states and the same KV cache, in decode steps (both halves fused), prompt steps and mixed
steps (the MLP half fused); bad cache slots are refused, not written."""

import pytest
import torch
from torch import nn

from hexcore.kernels import fused_layer
from hexcore.kernels.select import fused_layer_kernels
from hexcore.model.attention import AttentionMetadata
from hexcore.model.llama import FusedLlamaDecoderLayer, LlamaDecoderLayer
from hexcore.worker.stage_runner import single_rank_runner

BLOCK_SIZE = 4
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def kernels():
    kernels = fused_layer.load()
    assert kernels is not None, "the fused layer loops must build here (a C++ compiler and ninja)"
    return kernels


def test_cpu_float32_stages_fuse_their_layers_and_other_dtypes_do_not(kernels, tiny_model_dir):
    runner = single_rank_runner(tiny_model_dir, 8, "float32", NUM_BLOCKS, BLOCK_SIZE, 64)
    assert all(isinstance(layer, FusedLlamaDecoderLayer) for layer in runner.model.layers)
    assert fused_layer_kernels(torch.device("cpu"), torch.float32) is kernels
    assert fused_layer_kernels(torch.device("cpu"), torch.bfloat16) is None
    assert fused_layer_kernels(torch.device("meta"), torch.float32) is None


class Replay:
    """One stage and its KV cache, driven step by step as a worker drives it."""

    def __init__(self, model_dir, is_fused: bool):
        self.runner = single_rank_runner(model_dir, 8, "float32", NUM_BLOCKS, BLOCK_SIZE, 64)
        if not is_fused:
            self.runner.model.layers = nn.ModuleList([layer.layer for layer in self.runner.model.layers])
        assert all(isinstance(layer, LlamaDecoderLayer) != is_fused for layer in self.runner.model.layers)

    def step(self, token_ids, query_lens, context_lens, tables) -> torch.Tensor:
        runner = self.runner
        meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, torch.device("cpu"),
                                       decode_kernel=runner.decode_kernel)
        positions = torch.tensor([p for n, end in zip(query_lens, context_lens) for p in range(end - n, end)])
        return runner.model(torch.tensor(token_ids), positions, runner.kv_caches, meta)


def test_fused_layers_match_the_layers_own_ops_step_by_step(tiny_model_dir):
    fused, plain = Replay(tiny_model_dir, is_fused=True), Replay(tiny_model_dir, is_fused=False)
    generator = torch.Generator().manual_seed(0)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    prompt_lens = [5, 3, 7]
    steps = [(prompt_lens[:2], prompt_lens[:2], tables[:2])]  # prompts only: the MLP half fused
    lens = list(prompt_lens[:2])
    for _ in range(4):  # decodes only (contexts crossing block ends): both halves fused
        lens = [n + 1 for n in lens]
        steps.append(([1, 1], list(lens), tables[:2]))
    lens = [lens[0] + 1, lens[1] + 1, prompt_lens[2]]  # two decodes and a new prompt: the MLP half fused
    steps.append(([1, 1, prompt_lens[2]], list(lens), tables))
    lens = [n + 1 for n in lens]
    steps.append(([1, 1, 1], list(lens), tables))
    for query_lens, context_lens, step_tables in steps:
        token_ids = torch.randint(0, 416, (sum(query_lens),), generator=generator).tolist()
        expected = plain.step(token_ids, query_lens, context_lens, step_tables)
        hidden = fused.step(token_ids, query_lens, context_lens, step_tables)
        # the same loops in the same order; only rope's multiply-adds may round differently (fused in C++)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.runner.kv_caches, plain.runner.kv_caches, rtol=1e-5, atol=1e-5)
    assert fused.runner.kv_caches.abs().sum() > 0


def test_a_cache_slot_outside_the_cache_is_refused(kernels, tiny_model_dir):
    runner = single_rank_runner(tiny_model_dir, 8, "float32", NUM_BLOCKS, BLOCK_SIZE, 64)
    layer = runner.model.layers[0]
    x = torch.randn(1, runner.model.dims.hidden_size)
    cos, signed_sin = runner.model.cos[:1], runner.model.signed_sin[:1]
    k_cache, v_cache = runner.kv_caches[0]
    before = runner.kv_caches.clone()
    for slot in (-1, NUM_BLOCKS * BLOCK_SIZE):
        with pytest.raises(RuntimeError, match="cache slots must lie in the cache"):
            kernels.attention_block(x, *layer.attention_weights, cos, signed_sin, k_cache, v_cache,
                                    torch.tensor([slot]), torch.tensor([[0]]), torch.tensor([1]),
                                    layer.layer.attention.num_heads, layer.layer.attention.scale)
    assert torch.equal(runner.kv_caches, before)
