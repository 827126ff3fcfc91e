"""Replicas are failure domains, over real worker processes: a worker killed (SIGKILL) or stalled
(SIGSTOP) fails its replica alone; its requests move to a replica that is up and finish with the tokens
a failure-free run gives; the replica is restarted and rejoins; with no replica up, requests end with
a retryable error and service comes back with the restart; a replica that cannot restart stops the
engine. KV blocks are all free afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from hexcore.config import parse_config
from hexcore.engine.client import EngineDead, EngineUnavailable
from hexcore.engine.llm import LLM
from hexcore.sampling_params import SamplingParams
from tests.conftest import deployment

pytestmark = pytest.mark.slow  # starts worker processes

PROMPTS = ["The capital of France is", "Hello world", "A quick brown fox jumps over the lazy dog",
           "Once upon a time", "Tensor parallel", "cats and weather and questions about the tiny model"]
NUM_TOKENS = 40
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=50, seed=7, max_tokens=NUM_TOKENS, ignore_eos=True)


def run_with_failure(llm: LLM, params: list[SamplingParams], fail, after_steps: int = 4):
    """Run PROMPTS to completion, calling `fail(core)` once after `after_steps` steps. Returns each
    request's tokens and error (None when it completed)."""
    core = llm.core
    ids = [f"req-{i}" for i in range(len(PROMPTS))]
    for request_id, prompt, p in zip(ids, PROMPTS, params):
        core.add_request(request_id, llm.encode(prompt), p)
    tokens = {request_id: [] for request_id in ids}
    errors = {request_id: None for request_id in ids}
    num_steps = 0
    while core.has_unfinished:
        for output in core.step(timeout=1.0):
            tokens[output.request_id] += output.choices[0].token_ids if output.choices else []
            if output.error is not None:
                errors[output.request_id] = output.error
        num_steps += 1
        if num_steps == after_steps:
            fail(core)
    return [tokens[i] for i in ids], [errors[i] for i in ids]


def wait_until_up(llm: LLM, name: str, timeout: float) -> float:
    started = time.monotonic()
    replica = next(r for r in llm.core.replicas if r.name == name)
    while not replica.is_up:
        assert time.monotonic() - started < timeout, f"replica {name} not back within {timeout} s: {replica.down_reason}"
        llm.core.step(timeout=0.2, wait_when_idle=True)
    return time.monotonic() - started


def assert_all_blocks_free(llm: LLM) -> None:
    for replica in llm.core.replicas:
        assert replica.block_manager.num_free_blocks == replica.block_manager.num_blocks, replica.name


def kill_worker(replica_name: str, rank: int, signum=signal.SIGKILL):
    def fail(core):
        replica = next(r for r in core.replicas if r.name == replica_name)
        assert replica.in_flight or replica.scheduler.num_unfinished, "the replica must be busy when it fails"
        os.kill(replica.workers.processes[rank].pid, signum)
    return fail


@pytest.fixture(scope="module")
def two_replicas(tiny_model_dir):
    """r0: [TP1: 8 layers]; r1: [TP2: 4] -> [TP1: 4], two micro-batches."""
    raw = deployment(tiny_model_dir, [(1, 8)], [(2, 4), (1, 4)], max_num_batched_tokens=32)
    for name, replica in zip(("r0", "r1"), raw["replicas"]):  # equal weights: the router splits requests evenly
        replica.update(name=name, predicted_throughput_rps=1.0)
    with LLM(parse_config(raw)) as llm:
        reference = llm.generate(PROMPTS, [GREEDY, SEEDED] * 3)
        yield llm, [r.token_ids for r in reference]


@pytest.mark.parametrize("rank", [0, 2])
def test_sigkill_of_a_worker_moves_its_requests_and_every_stream_completes_unchanged(two_replicas, rank):
    llm, reference = two_replicas
    replicas = {r.name: r for r in llm.core.replicas}
    wait_until_up(llm, "r1", timeout=30)  # after the previous case's restart
    restarts = replicas["r1"].num_restarts
    tokens, errors = run_with_failure(llm, [GREEDY, SEEDED] * 3, kill_worker("r1", rank))
    assert errors == [None] * len(PROMPTS)
    assert [len(t) for t in tokens] == [NUM_TOKENS] * len(PROMPTS)
    assert tokens == reference  # greedy and seeded: the same tokens as without the failure
    assert replicas["r1"].num_resumed > 0 and replicas["r0"].num_resumed == 0
    assert wait_until_up(llm, "r1", timeout=30) < 30
    assert replicas["r1"].num_restarts == restarts + 1
    assert_all_blocks_free(llm)
    num_steps = replicas["r1"].metrics.num_steps
    assert [r.token_ids for r in llm.generate(PROMPTS, [GREEDY, SEEDED] * 3)] == reference
    assert replicas["r1"].metrics.num_steps > num_steps  # the restarted replica serves again


def test_a_stalled_worker_is_detected_and_handled_like_a_death(tiny_model_dir):
    raw = deployment(tiny_model_dir, [(1, 8)], [(1, 4), (1, 4)], max_num_batched_tokens=32,
                     stall_timeout_seconds=2.0)
    for replica in raw["replicas"]:
        replica["predicted_throughput_rps"] = 1.0
    with LLM(parse_config(raw)) as llm:
        reference = [r.token_ids for r in llm.generate(PROMPTS, [GREEDY] * len(PROMPTS))]
        stalled = llm.core.replicas[1]
        started = time.monotonic()
        tokens, errors = run_with_failure(llm, [GREEDY] * len(PROMPTS), kill_worker(stalled.name, 1, signal.SIGSTOP))
        assert errors == [None] * len(PROMPTS) and tokens == reference
        assert stalled.num_resumed > 0 and "stalled" in (stalled.down_reason or "stalled")
        assert time.monotonic() - started < 30
        wait_until_up(llm, stalled.name, timeout=30)
        assert_all_blocks_free(llm)


def test_with_one_replica_requests_end_with_a_retryable_error_then_service_comes_back(tiny_model_dir):
    with LLM(parse_config(deployment(tiny_model_dir, [(1, 4), (1, 4)]))) as llm:
        reference = llm.generate(PROMPTS[:1], GREEDY)[0].token_ids
        tokens, errors = run_with_failure(llm, [GREEDY] * len(PROMPTS), kill_worker(llm.core.replicas[0].name, 0))
        assert all(error is not None and error.is_retryable for error in errors)
        with pytest.raises(EngineUnavailable, match="no replica is up"):  # while it restarts
            llm.core.add_request("during-restart", llm.encode("Hello"), GREEDY)
        wait_until_up(llm, llm.core.replicas[0].name, timeout=30)
        assert llm.generate(PROMPTS[:1], GREEDY)[0].token_ids == reference
        assert_all_blocks_free(llm)


def test_a_replica_that_cannot_restart_stops_the_engine_within_its_attempts(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    with LLM(parse_config(deployment(model_dir, [(1, 8)], max_restart_attempts=2))) as llm:
        run_with_failure(llm, [GREEDY] * len(PROMPTS), lambda core: (shutil.rmtree(model_dir),
                                                                     kill_worker("r0", 0)(core)))
        started = time.monotonic()
        with pytest.raises(EngineDead, match="did not come back after 2 restarts"):
            while time.monotonic() - started < 60:
                llm.core.step(timeout=0.2, wait_when_idle=True)
