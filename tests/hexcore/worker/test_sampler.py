"""The sampler, row by row: filters, penalties, bans, reproducible seeded draws."""

from __future__ import annotations

import torch

from hexcore.executor.messages import SeqSampling
from hexcore.worker.sampler import filter_logits, sample, sample_one
from hexcore.sampling_params import SamplingParams


def spec(**fields) -> SeqSampling:
    extra = {k: fields.pop(k) for k in ("seed", "num_generated", "banned_token_ids", "output_token_ids") if k in fields}
    return SeqSampling(params=SamplingParams(**fields), seed=extra.get("seed", 0),
                       num_generated=extra.get("num_generated", 0),
                       banned_token_ids=extra.get("banned_token_ids", ()),
                       output_token_ids=extra.get("output_token_ids", ()))


LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0])


def test_greedy_and_banned_tokens():
    assert sample_one(LOGITS, spec(temperature=0.0)).token_id == 1
    assert sample_one(LOGITS, spec(temperature=0.0, banned_token_ids=(1,))).token_id == 2


def test_filters_keep_the_right_tokens():
    kept = lambda logits: set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())
    assert kept(filter_logits(LOGITS, top_k=2, top_p=1.0, min_p=0.0)) == {1, 2}
    probs = torch.softmax(LOGITS, -1)  # 0.05, 0.55, 0.33, 0.01, 0.03 (rounded)
    assert kept(filter_logits(LOGITS, top_k=0, top_p=0.5, min_p=0.0)) == {1}
    assert kept(filter_logits(LOGITS, top_k=0, top_p=0.6, min_p=0.0)) == {1, 2}
    assert kept(filter_logits(LOGITS, top_k=0, top_p=1.0, min_p=0.5)) == {1, 2}
    assert probs.argmax() == 1


def test_seeded_draws_are_reproducible_and_depend_on_the_position():
    flat = torch.zeros(1000)
    draws = [sample_one(flat, spec(temperature=1.0, seed=3, num_generated=i)).token_id for i in range(5)]
    assert draws == [sample_one(flat, spec(temperature=1.0, seed=3, num_generated=i)).token_id for i in range(5)]
    assert len(set(draws)) > 1


def test_sampling_follows_the_distribution():
    counts = torch.zeros(5)
    for i in range(2000):
        counts[sample_one(LOGITS, spec(temperature=1.0, seed=1, num_generated=i)).token_id] += 1
    assert torch.allclose(counts / 2000, torch.softmax(LOGITS, -1), atol=0.03)


def test_penalties_push_repeated_tokens_down():
    assert sample_one(LOGITS, spec(temperature=0.0, frequency_penalty=1.0, output_token_ids=(1,))).token_id == 2
    assert sample_one(LOGITS, spec(temperature=0.0, presence_penalty=0.4, output_token_ids=(1, 1))).token_id == 1
    assert sample_one(LOGITS, spec(temperature=0.0, repetition_penalty=2.0, output_token_ids=(1,))).token_id == 2


def test_logprobs_are_of_the_raw_distribution():
    token = sample_one(LOGITS, spec(temperature=0.0, logprobs=2))
    expected = torch.log_softmax(LOGITS, -1)
    assert abs(token.logprob - expected[1]) < 1e-6
    assert set(token.top) == {1, 2}


def test_a_batch_gives_each_row_its_own_token():
    """Plain greedy rows share one batched argmax; every row still gets what sampling it alone gives,
    ties included (the first of equal maxima)."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    logits[0, [7, 9]] = 10.0  # a tie
    specs = [spec(temperature=0.0), spec(temperature=0.0, banned_token_ids=(int(logits[1].argmax()),)),
             spec(temperature=0.8, seed=5), spec(temperature=0.0, logprobs=2),
             spec(temperature=0.0, presence_penalty=1.5, output_token_ids=(int(logits[4].argmax()),)),
             spec(temperature=0.0)]
    batched = sample(logits, specs)
    assert batched == [sample_one(row, s) for row, s in zip(logits, specs)]
    assert batched[0].token_id == 7
