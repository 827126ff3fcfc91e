"""Engine behaviour over real worker processes: continuous batching gives each request the tokens it
gets alone, n>1, stop strings, aborts and preemption leave no KV block behind, bad requests are
rejected while serving goes on, and micro-batches overlap across pipeline stages."""

from __future__ import annotations

import pytest

from hexcore.config import parse_config
from hexcore.engine.llm import LLM
from hexcore.sampling_params import InvalidParameter, SamplingParams
from tests.conftest import deployment

pytestmark = pytest.mark.slow  # starts worker processes

PROMPTS = ["The capital of France is", "Hello world", "A quick brown fox jumps over the lazy dog",
           "Once upon a time", "Tensor parallel", "cats and weather and questions about the tiny model"]
MIXED_PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=9, ignore_eos=True),
    SamplingParams(temperature=1.2, top_k=20, seed=12, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=5, presence_penalty=0.5, frequency_penalty=0.7, ignore_eos=True),
    SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.3, seed=13, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=14, max_tokens=12, min_tokens=12),
]


@pytest.fixture(scope="module")
def pipeline_llm(tiny_model_dir):
    """Two stages [TP2: 5 layers] -> [TP1: 3 layers], two micro-batches, a small token budget."""
    config = parse_config(deployment(tiny_model_dir, [(2, 5), (1, 3)], max_num_batched_tokens=16))
    with LLM(config) as llm:
        yield llm


def test_batched_requests_get_the_tokens_they_get_alone(pipeline_llm):
    together = pipeline_llm.generate(PROMPTS, MIXED_PARAMS)
    for prompt, params, result in zip(PROMPTS, MIXED_PARAMS, together):
        alone = pipeline_llm.generate([prompt], params)[0]
        assert result.token_ids == alone.token_ids
        assert len(result.token_ids) == params.max_tokens


def test_n_choices_are_independent_and_reproducible(pipeline_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    first, again = pipeline_llm.generate(["Hello world"] * 2, params)
    choices = [c.token_ids for c in first.completions]
    assert len(choices) == 3 and len({tuple(c) for c in choices}) == 3
    assert choices == [c.token_ids for c in again.completions]


def test_stop_string_split_across_tokens_is_caught_and_not_returned(pipeline_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = pipeline_llm.generate(["Once upon a time"], greedy)[0]
    tokenizer = pipeline_llm.tokenizer
    pieces = [tokenizer.decode(reference.token_ids[: i + 1]) for i in range(len(reference.token_ids))]
    boundary = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 3 and len(pieces[i]) > len(pieces[i - 1]))
    # a stop string made of the last 2 characters of one token's text and the first of the next
    cut = len(pieces[boundary - 1])
    stop = pieces[boundary][cut - 2 : cut + 1]
    result = pipeline_llm.generate(["Once upon a time"], SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop=(stop,)))[0]
    expected = reference.text[: reference.text.find(stop)]
    assert result.text == expected and stop not in result.text
    assert result.completions[0].finish_reason == "stop"


def test_too_long_prompt_is_rejected_and_serving_goes_on(pipeline_llm):
    with pytest.raises(InvalidParameter, match="max_model_len") as err:
        pipeline_llm.generate([[5] * 600], SamplingParams(max_tokens=4))
    assert err.value.param == "prompt"
    with pytest.raises(InvalidParameter, match="max_tokens"):
        pipeline_llm.generate([[5] * 10], SamplingParams(max_tokens=510))
    assert len(pipeline_llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4


def test_preemption_abort_and_finish_leave_every_block_free(tiny_model_dir):
    """12 blocks of 8 tokens cannot hold 6 requests of ~40 tokens at once: sequences are preempted
    and recomputed, yet each still gets its greedy tokens; aborts free their blocks at once."""
    config = parse_config(deployment(tiny_model_dir, [(1, 4), (1, 4)], num_kv_blocks=12, block_size=8))
    with LLM(config) as llm:
        core = llm.core
        blocks = core.replicas[0].block_manager
        greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        alone = [llm.generate([p], greedy)[0].token_ids for p in PROMPTS]
        for i, prompt in enumerate(PROMPTS):
            core.add_request(f"keep-{i}", llm.encode(prompt), greedy)
        for i in range(3):
            core.add_request(f"drop-{i}", llm.encode(PROMPTS[i]), greedy)
        tokens = {f"keep-{i}": [] for i in range(len(PROMPTS))}
        num_steps = 0
        while core.has_unfinished:
            for output in core.step(timeout=5):
                if output.request_id in tokens:
                    tokens[output.request_id] += output.choices[0].token_ids
            num_steps += 1
            if num_steps == 6:
                assert blocks.num_used_blocks > 0
                for i in range(3):
                    core.abort(f"drop-{i}")
        assert core.replicas[0].scheduler.num_preemptions > 0
        assert [tokens[f"keep-{i}"] for i in range(len(PROMPTS))] == alone
        assert blocks.num_free_blocks == blocks.num_blocks == 12


def test_micro_batches_overlap_across_pipeline_stages(tiny_model_dir):
    """With one micro-batch in flight, stage 0 never computes a step while stage 1 computes another;
    with two, they do, as the workers' own step timestamps show."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    overlap = {}
    for num_micro_batches in (1, 2):
        config = parse_config(deployment(tiny_model_dir, [(1, 4), (1, 4)], num_micro_batches=num_micro_batches,
                                         num_threads_per_worker=1))
        with LLM(config) as llm:
            llm.generate(PROMPTS * 2, params)
            llm.core.collect_worker_stats()
            stats = llm.core.replicas[0].workers.stats
            first, second = stats[0].recent_steps, stats[1].recent_steps
            overlap[num_micro_batches] = sum(max(0.0, min(a_end, b_end) - max(a_start, b_start))
                                             for a_step, a_start, a_end in first
                                             for b_step, b_start, b_end in second if a_step != b_step)
            busy = llm.core.stats().replicas[0].stage_busy_fraction
            assert len(busy) == 2 and all(0 < fraction <= 1 for fraction in busy)
    assert overlap[1] == 0.0
    assert overlap[2] > 0.0


def test_prefix_cache_hits_give_the_same_tokens(pipeline_llm):
    system = "Once upon a time there was a tiny model that answered questions about the weather and cats. "
    prompts = [system + "Hello world", system + "The capital of France is"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    blocks = pipeline_llm.core.replicas[0].block_manager
    first = pipeline_llm.generate(prompts[:1], greedy)[0]
    hits = blocks.num_cache_hits
    second = pipeline_llm.generate(prompts[1:], greedy)[0]
    assert blocks.num_cache_hits > hits  # the shared system prompt was not computed again
    pipeline_llm.core.replicas[0].block_manager.enable_prefix_caching = False
    try:
        assert pipeline_llm.generate(prompts, greedy)[1].token_ids == second.token_ids
        assert pipeline_llm.generate(prompts[:1], greedy)[0].token_ids == first.token_ids
    finally:
        pipeline_llm.core.replicas[0].block_manager.enable_prefix_caching = True
    assert blocks.num_free_blocks == blocks.num_blocks


def test_every_worker_is_warm_before_the_first_request(tiny_model_dir):
    """Start-up sends one token through the pipeline: each worker has run a step, yet no KV block is
    held and the replica's metrics start from zero."""
    config = parse_config(deployment(tiny_model_dir, [(2, 5), (1, 3)]))
    with LLM(config) as llm:
        llm.core.collect_worker_stats()
        replica = llm.core.replicas[0]
        assert [replica.workers.stats[rank].num_steps for rank in range(3)] == [1, 1, 1]
        assert replica.block_manager.num_free_blocks == replica.block_manager.num_blocks
        assert replica.metrics.num_steps == 0 and not replica.in_flight
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        assert llm.generate(["Hello world"], greedy)[0].token_ids == llm.generate(["Hello world"], greedy)[0].token_ids
