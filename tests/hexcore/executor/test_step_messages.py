"""The driver's per-rank step messages: each role gets only what it needs, and a sequence's state is
sent once and then as increments, until its blocks are freed or the workers are new."""

from __future__ import annotations

from hexcore.executor.messages import PromptScoring, SeqSampling, StepBatch
from hexcore.executor.step_messages import Role, StepMessages
from hexcore.sampling_params import SamplingParams

FIRST, MIDDLE = Role(True, False, False), Role(False, False, False)
LAST, SAMPLING = Role(False, True, False), Role(False, True, True)  # [TP1 -> TP1 -> TP2]
GREEDY = SamplingParams(temperature=0.0)
PENALISED = SamplingParams(temperature=0.0, frequency_penalty=0.5, repetition_penalty=1.2)


def step(step_id: int, seqs: list[tuple], scoring: list | None = None) -> StepBatch:
    """seqs: (seq id, query len, context len, block table, SeqSampling or None) per sequence."""
    token_ids = [7] * sum(seq[1] for seq in seqs)
    return StepBatch(step_id, [s[0] for s in seqs], token_ids, [s[1] for s in seqs], [s[2] for s in seqs],
                     [list(s[3]) for s in seqs], [s[4] is not None for s in seqs], [s[4] for s in seqs],
                     scoring or [None] * len(seqs))


def spec(params=GREEDY, seq_id=0, outputs=(), prompt=(), banned=()) -> SeqSampling:
    """As the driver builds it: the output tokens only when penalties need them."""
    return SeqSampling(params, seed=11, num_generated=len(outputs), banned_token_ids=banned,
                       output_token_ids=tuple(outputs) if params.has_penalties else (),
                       prompt_token_ids=tuple(prompt), seq_id=seq_id)


def test_each_role_gets_only_its_part_and_same_roles_share_one_message():
    messages = StepMessages([FIRST, MIDDLE, LAST, SAMPLING])
    scoring = PromptScoring(0, [4, 5], 1)
    built = messages.build(step(0, [(3, 3, 3, [0], spec(seq_id=3)), (4, 2, 2, [1], None)], [scoring, None]))
    assert set(built) == {FIRST, MIDDLE, LAST, SAMPLING}
    assert built[FIRST].token_ids == [7] * 5
    assert built[MIDDLE].token_ids is None and built[LAST].token_ids is None and built[SAMPLING].token_ids is None
    for role in (FIRST, MIDDLE):  # they score nothing
        assert built[role].unsampled is None and built[role].prompt_scoring is None and built[role].sampling is None
    assert built[LAST].unsampled == built[SAMPLING].unsampled == [1]
    assert built[LAST].prompt_scoring == built[SAMPLING].prompt_scoring == [scoring, None]
    assert built[LAST].sampling is None
    assert list(built[SAMPLING].sampling.new_seqs) == [3]
    assert all(m.new_block_ids == [[0], [1]] for m in built.values())
    assert len(StepMessages([FIRST, FIRST, LAST, LAST]).roles) == 2


def test_a_known_sequence_gets_only_its_new_blocks_and_no_sampling_params():
    messages = StepMessages([FIRST, SAMPLING])
    first = messages.build(step(0, [(0, 4, 4, [5], spec())]))[SAMPLING]
    assert first.new_block_ids == [[5]]
    start = first.sampling.new_seqs[0]
    assert (start.params, start.seed, start.num_prompt_tokens, start.prompt_token_ids) == (GREEDY, 11, 4, ())
    second = messages.build(step(1, [(0, 1, 5, [5], spec(outputs=[9]))]))[SAMPLING]
    assert second.new_block_ids == [[]]
    assert second.sampling.new_seqs == {} and second.sampling.new_output_ids == {}  # greedy: no history needed
    third = messages.build(step(2, [(0, 1, 6, [5, 2], spec(outputs=[9, 8]))]))[SAMPLING]
    assert third.new_block_ids == [[2]] and third.sampling.new_seqs == {}


def test_penalties_get_the_prompt_once_and_output_tokens_as_increments():
    messages = StepMessages([SAMPLING])
    prompt = [3, 4, 5]
    first = messages.build(step(0, [(0, 3, 3, [0], spec(PENALISED, prompt=prompt))]))[SAMPLING].sampling
    assert first.new_seqs[0].prompt_token_ids == (3, 4, 5) and first.new_output_ids == {}
    second = messages.build(step(1, [(0, 1, 4, [0], spec(PENALISED, prompt=prompt, outputs=[9]))]))[SAMPLING].sampling
    assert second.new_seqs == {} and second.new_output_ids == {0: [9]}
    third = messages.build(step(2, [(0, 1, 5, [0], spec(PENALISED, prompt=prompt, outputs=[9, 8]))]))[SAMPLING]
    assert third.sampling.new_output_ids == {0: [8]}


def test_bans_are_sent_while_they_apply():
    messages = StepMessages([SAMPLING])
    params = SamplingParams(temperature=0.0, min_tokens=1)
    assert messages.build(step(0, [(0, 2, 2, [0], spec(params, banned=(1,)))]))[SAMPLING].sampling.banned_token_ids \
        == {0: (1,)}
    assert messages.build(step(1, [(0, 1, 3, [0], spec(params, outputs=[4]))]))[SAMPLING].sampling.banned_token_ids \
        == {}


def test_a_freed_sequence_is_dropped_once_and_sent_whole_when_it_comes_back():
    messages = StepMessages([FIRST, SAMPLING])
    messages.build(step(0, [(0, 4, 4, [5], spec()), (1, 4, 4, [6], spec(seq_id=1))]))
    messages.forget([0, 42])  # 42: freed before any rank saw it
    preempted_back = messages.build(step(1, [(0, 4, 4, [7], spec()), (1, 1, 5, [6], spec(seq_id=1, outputs=[3]))]))
    for message in preempted_back.values():
        assert message.dropped_seq_ids == [0] and message.new_block_ids == [[7], []]
    assert list(preempted_back[SAMPLING].sampling.new_seqs) == [0]
    assert messages.build(step(2, [(1, 1, 6, [6], spec(seq_id=1, outputs=[3, 3]))]))[FIRST].dropped_seq_ids == []


def test_new_workers_get_everything_again():
    batch = step(0, [(0, 1, 20, [5, 6], spec(outputs=[1, 2]))])
    messages = StepMessages([SAMPLING])
    messages.build(batch)
    assert messages.build(batch)[SAMPLING].new_block_ids == [[]]
    again = StepMessages([SAMPLING]).build(batch)[SAMPLING]  # a restart's workers come with a new mirror
    assert again.new_block_ids == [[5, 6]] and list(again.sampling.new_seqs) == [0]
