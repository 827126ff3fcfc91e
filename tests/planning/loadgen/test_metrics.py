"""Serving-benchmark arithmetic from synthetic timestamps, and the prompt and arrival generators."""

import dataclasses
import json
import math
import random

import pytest

from planning.loadgen.datasets import file_requests, random_requests
from planning.loadgen.metrics import RequestRecord, Slo, record_from_timestamps, summarize
from planning.loadgen.command import arrival_offsets, root_url


def test_record_from_timestamps_ttft_itl_e2e_tpot():
    record = record_from_timestamps([0.1, 0.15, 0.25, 0.45], last_choice_time=0.5, num_output_tokens=4)
    assert record.is_success
    assert record.ttft == pytest.approx(0.1)
    assert record.itls == pytest.approx((0.05, 0.1, 0.2))
    assert record.e2e == pytest.approx(0.5)  # the last choice chunk, e.g. the finish_reason one
    assert record.tpot == pytest.approx((0.5 - 0.1) / 3)


def test_tpot_counts_tokens_not_chunks():
    # two text chunks carrying 5 tokens in all: TPOT divides by output tokens - 1
    record = record_from_timestamps([0.2, 0.6], last_choice_time=0.6, num_output_tokens=5)
    assert record.itls == pytest.approx((0.4,))
    assert record.tpot == pytest.approx(0.4 / 4)


def test_stream_without_text_is_a_failure():
    assert not record_from_timestamps([], last_choice_time=0.3, num_output_tokens=0).is_success


def test_single_token_request_has_zero_tpot_and_is_left_out_of_tpot_stats():
    one = RequestRecord(is_success=True, ttft=0.1, e2e=0.1, num_output_tokens=1)
    two = RequestRecord(is_success=True, ttft=0.1, e2e=0.3, num_output_tokens=3)
    summary = summarize([one, two], duration_s=1.0, slo=Slo(tpot_ms=50))
    assert one.tpot == 0.0
    assert summary.tpot.mean_ms == pytest.approx(100.0)  # only `two`: (0.3 - 0.1) / 2
    assert summary.goodput == pytest.approx(1.0)  # `one` meets the TPOT SLO, `two` misses it


def test_summary_throughputs_percentiles_and_goodput():
    records = [
        RequestRecord(True, ttft=0.1, e2e=1.1, itls=(0.5, 0.5), num_prompt_tokens=10, num_output_tokens=3),
        RequestRecord(True, ttft=0.3, e2e=0.9, itls=(0.2, 0.2, 0.2), num_prompt_tokens=20, num_output_tokens=4),
        RequestRecord(False, error="HTTP 500"),
    ]
    summary = summarize(records, duration_s=2.0, slo=Slo(ttft_ms=200, tpot_ms=600))
    assert (summary.num_completed, summary.num_failed) == (2, 1)
    assert summary.total_input_tokens == 30 and summary.total_output_tokens == 7
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(3.5)
    assert summary.total_token_throughput == pytest.approx(18.5)
    # TTFTs 100 and 300 ms: linear interpolation between the two
    assert dataclasses.astuple(summary.ttft) == pytest.approx((200.0, 200.0, 280.0, 298.0))
    assert summary.tpot.mean_ms == pytest.approx((500.0 + 200.0) / 2)
    assert summary.itl.median_ms == pytest.approx(200.0)  # pooled gaps 500, 500, 200, 200, 200
    assert summary.e2e.mean_ms == pytest.approx(1000.0)
    # only the first meets TTFT <= 200 ms; its TPOT 500 ms <= 600 ms too
    assert summary.goodput == pytest.approx(0.5)
    assert summarize(records, duration_s=2.0).goodput is None


def test_summary_rejects_non_positive_duration():
    with pytest.raises(ValueError, match="duration"):
        summarize([], duration_s=0.0)


def test_poisson_arrivals_have_the_requested_mean_rate_and_are_seeded():
    offsets = arrival_offsets(4000, 4.0, random.Random(1))
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(0.25, rel=0.05)
    assert offsets == arrival_offsets(4000, 4.0, random.Random(1))
    assert arrival_offsets(3, math.inf, random.Random(1)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(3, 0.0, random.Random(1))


def test_root_url_accepts_v1_suffix():
    assert root_url("http://h:1/v1/") == root_url("http://h:1") == "http://h:1"


def test_random_word_prompts_without_tokenizer():
    requests = random_requests(5, input_len=12, output_len=7, rng=random.Random(0))
    assert len(requests) == 5 and len({r.prompt for r in requests}) == 5
    assert all(len(r.prompt.split()) == 12 and r.num_output_tokens == 7 for r in requests)
    assert all(r.num_prompt_tokens is None for r in requests)


def test_file_dataset_cycles_and_reads_output_len(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a", "output_len": 3}) + "\n\n" + json.dumps({"prompt": "b"}) + "\n")
    requests = file_requests(path, num_prompts=3, output_len=9)
    assert [(r.prompt, r.num_output_tokens) for r in requests] == [("a", 3), ("b", 9), ("a", 3)]
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=":1:"):
        file_requests(path, num_prompts=1, output_len=9)
