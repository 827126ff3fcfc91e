"""A worker's per-sequence state: from its role's increments it rebuilds the step the driver built,
minus what its role does not need; freed sequences are dropped."""

from __future__ import annotations

import dataclasses

from hexcore.executor.messages import PromptScoring, SeqSampling, StepBatch
from hexcore.executor.step_messages import Role, StepMessages
from hexcore.sampling_params import SamplingParams
from hexcore.worker.seq_state import SeqStates

FIRST, MIDDLE = Role(True, False, False), Role(False, False, False)
LAST, SAMPLING = Role(False, True, False), Role(False, True, True)
ROLES = [FIRST, MIDDLE, LAST, SAMPLING]
PENALISED = SamplingParams(temperature=0.7, presence_penalty=0.3, repetition_penalty=1.1, min_tokens=2)
GREEDY = SamplingParams(temperature=0.0)


def driver_steps() -> list[tuple[list[int], StepBatch]]:
    """(freed seq ids, step): a penalised sequence 0 (prompt 5 tokens in two chunks, then decodes with a
    block appended and its bans lifted), a greedy sequence 1 with prompt scoring, then 1 is preempted and
    recomputed on other blocks, and 0 finishes."""
    prompt = [10, 11, 12, 13, 14]

    def spec0(outputs):
        return SeqSampling(PENALISED, 5, len(outputs), (2,) if len(outputs) < 2 else (), tuple(outputs),
                           tuple(prompt), 0)

    def spec1(num_generated):
        return SeqSampling(GREEDY, 6, num_generated, seq_id=1)

    def batch(step_id, rows, scoring=None):
        return StepBatch(step_id, [r[0] for r in rows], [1] * sum(r[1] for r in rows), [r[1] for r in rows],
                         [r[2] for r in rows], [list(r[3]) for r in rows], [r[4] is not None for r in rows],
                         [r[4] for r in rows], scoring or [None] * len(rows))

    return [
        ([], batch(0, [(0, 3, 3, [4], None), (1, 3, 3, [9], spec1(0))], [None, PromptScoring(0, [7, 8], 2)])),
        ([], batch(1, [(0, 2, 5, [4, 5], spec0([])), (1, 1, 4, [9], spec1(1))])),
        ([], batch(2, [(0, 1, 6, [4, 5], spec0([30]))])),
        ([], batch(3, [(0, 1, 7, [4, 5, 6], spec0([30, 31])), (1, 1, 5, [9, 2], spec1(2))])),
        ([1], batch(4, [(1, 4, 4, [3], None), (0, 1, 8, [4, 5, 6], spec0([30, 31, 32]))])),
        ([0], batch(5, [(1, 2, 6, [3, 8], spec1(2))])),
    ]


def run(role: Role) -> tuple[SeqStates, list[tuple[StepBatch, StepBatch]]]:
    messages, states, pairs = StepMessages([role]), SeqStates(), []
    for freed, batch in driver_steps():
        messages.forget(freed)
        pairs.append((batch, states.step(messages.build(batch)[role])))
    return states, pairs


def test_the_sampling_rank_rebuilds_the_drivers_step():
    states, pairs = run(SAMPLING)
    for driver, worker in pairs:
        assert dataclasses.replace(worker, token_ids=driver.token_ids) == driver
    assert states.num_seqs == 1  # 0 finished; 1 runs again


def test_other_roles_get_the_steps_shape_and_blocks_only():
    for role in (FIRST, MIDDLE, LAST):
        states, pairs = run(role)
        for driver, worker in pairs:
            assert (worker.seq_ids, worker.query_lens, worker.context_lens, worker.block_tables, worker.positions) \
                == (driver.seq_ids, driver.query_lens, driver.context_lens, driver.block_tables, driver.positions)
            assert worker.num_tokens == driver.num_tokens
            assert worker.token_ids == (driver.token_ids if role.is_first else [])
            if role.is_last:
                assert worker.scored_rows() == driver.scored_rows() and not any(worker.sampling)
            else:
                assert worker.sampled == worker.sampling == worker.prompt_scoring == []
        assert states.num_seqs == 1


def test_a_dropped_sequence_is_forgotten_and_a_readmitted_one_starts_empty():
    messages, states = StepMessages([SAMPLING]), SeqStates()
    greedy = SeqSampling(GREEDY, 0, 0, seq_id=4)
    first = StepBatch(0, [4], [1, 1], [2], [2], [[7]], [True], [greedy], [None])
    states.step(messages.build(first)[SAMPLING])
    messages.forget([4])
    again = StepBatch(1, [4], [1, 1], [2], [2], [[3]], [True], [greedy], [None])
    assert states.step(messages.build(again)[SAMPLING]).block_tables == [[3]]
    messages.forget([4])
    other = StepBatch(2, [5], [1], [1], [1], [[0]], [True], [dataclasses.replace(greedy, seq_id=5)], [None])
    states.step(messages.build(other)[SAMPLING])
    assert states.num_seqs == 1
