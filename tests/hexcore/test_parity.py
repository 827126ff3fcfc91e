"""The distributed model against HF transformers running the same weights unsplit: identical greedy
tokens, and log-probabilities (the logits up to a per-row constant) within 1e-4, for every prompt and
generated position, over several asymmetric TP/PP layouts. Every worker is its own OS process."""

from __future__ import annotations

import pytest
from hexcore.config import parse_config
from hexcore.engine.llm import LLM
from hexcore.sampling_params import SamplingParams
from tests.conftest import deployment
from tests.hexcore.hf_reference import greedy_reference

pytestmark = pytest.mark.slow  # starts worker processes

NUM_NEW_TOKENS = 32
PROMPTS = ["The capital of France is", "Hello world", "A quick brown fox jumps over the lazy dog and then some more"]
TOLERANCE = 1e-4


def assert_matches_hf(model_dir, results) -> None:
    for result in results:
        ref_tokens, ref_logprobs = greedy_reference(model_dir, result.prompt_token_ids, NUM_NEW_TOKENS)
        assert result.token_ids == ref_tokens
        num_prompt = len(result.prompt_token_ids)
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == num_prompt
        scored = [(num_prompt - 1 + i, lp) for i, lp in enumerate(result.completions[0].logprobs)]
        scored += [(p - 1, lp) for p, lp in enumerate(result.prompt_logprobs) if lp is not None]
        for position, logprob in scored:
            assert len(logprob.top) == 20
            assert abs(logprob.logprob - ref_logprobs[position, logprob.token_id]) < TOLERANCE
            for token_id, value in logprob.top.items():
                assert abs(value - ref_logprobs[position, token_id]) < TOLERANCE


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=20, prompt_logprobs=20)

LAYOUTS = {
    "tp1": [[(1, 8)]],
    "tp2": [[(2, 8)]],
    "tp2x5-tp1x3": [[(2, 5), (1, 3)]],
    "tp1x2-tp2x5-tp1x1": [[(1, 2), (2, 5), (1, 1)]],
    "two-replicas": [[(1, 8)], [(2, 5), (1, 3)]],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_hf(tiny_model_dir, name):
    config = parse_config(deployment(tiny_model_dir, *LAYOUTS[name]))
    with LLM(config) as llm:
        prompts = PROMPTS * 2 if len(config.replicas) > 1 else PROMPTS
        results = llm.generate(prompts, GREEDY)
    if len(config.replicas) > 1:
        assert {r.replica for r in results} == {"r0", "r1"}, "both replicas serve"
    assert_matches_hf(tiny_model_dir, results)


def test_tp3_with_tied_embeddings_and_uneven_vocab_shards(tiny_tied_model_dir):
    """TP 3 -> 1 with tied embeddings: the vocabulary (416) splits 139/139/138 over three ranks."""
    config = parse_config(deployment(tiny_tied_model_dir, [(3, 4), (1, 2)]))
    with LLM(config) as llm:
        results = llm.generate(PROMPTS, GREEDY)
    assert_matches_hf(tiny_tied_model_dir, results)
