"""Scheduler and block manager, without processes: budgets, chunking, micro-batch caps, preemption."""

from __future__ import annotations

from hexcore.engine.block_manager import BlockManager
from hexcore.sampling_params import SamplingParams
from hexcore.engine.scheduler import Scheduler
from hexcore.engine.sequence import Sequence, SequenceStatus


def make_seq(seq_id: int, num_prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, f"req-{seq_id}", 0, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                    seed=0, max_tokens=max_tokens)


def complete(batch, blocks: BlockManager | None = None, sampled_token: int = 7) -> None:
    """What the engine does when a step comes back: tokens are cached (and registered for prefix
    caching), the next one is appended."""
    for item in batch:
        item.seq.is_in_flight = False
        item.seq.num_computed_tokens = item.end
        if blocks is not None:
            blocks.register_computed(item.seq)
        if item.completes_known_tokens:
            item.seq.output_token_ids.append(sampled_token)


def test_long_prompt_is_chunked_and_decodes_go_first():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = make_seq(0, 3), make_seq(1, 25)
    scheduler.add(short)
    scheduler.add(long)
    batch = scheduler.schedule(max_seqs=8)
    assert [(b.seq.seq_id, b.num_new_tokens) for b in batch] == [(0, 3), (1, 7)]
    assert [b.completes_known_tokens for b in batch] == [True, False]
    complete(batch)
    batch = scheduler.schedule(max_seqs=8)  # the decode of seq 0 first, then 9 more prompt tokens
    assert [(b.seq.seq_id, b.start, b.end) for b in batch] == [(0, 3, 4), (1, 7, 16)]


def test_in_flight_sequences_are_not_scheduled_twice_and_micro_batches_split_the_running():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(4):
        scheduler.add(make_seq(i, 2))
    first = scheduler.schedule(max_seqs=2)
    second = scheduler.schedule(max_seqs=2)
    assert [b.seq.seq_id for b in first] == [0, 1] and [b.seq.seq_id for b in second] == [2, 3]
    assert scheduler.schedule(max_seqs=2) == []


def test_preemption_frees_the_youngest_and_recomputes_it():
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    old, young = make_seq(0, 8), make_seq(1, 8)
    scheduler.add(old)
    scheduler.add(young)
    complete(scheduler.schedule(max_seqs=8))  # both prompts: all 4 blocks used
    assert blocks.num_free_blocks == 0
    batch = scheduler.schedule(max_seqs=8)  # old needs a 3rd block: young is preempted
    assert [b.seq.seq_id for b in batch] == [0]
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0 and young.block_table == []
    assert scheduler.waiting[0] is young and scheduler.num_preemptions == 1
    assert blocks.take_freed_seq_ids() == [1] and blocks.take_freed_seq_ids() == []  # its workers drop it
    complete(batch)
    scheduler.finish(old, "stop")
    batch = scheduler.schedule(max_seqs=8)  # young comes back: prompt and its output token again
    assert [(b.seq.seq_id, b.start, b.end) for b in batch] == [(1, 0, 9)]
    scheduler.finish(young, "abort")
    assert blocks.num_free_blocks == blocks.num_blocks
    assert blocks.take_freed_seq_ids() == [0, 1]  # finished, aborted


def test_block_manager_grows_by_whole_blocks_and_frees_everything():
    blocks = BlockManager(num_blocks=5, block_size=4)
    seq = make_seq(0, 1)
    assert blocks.can_grow(seq, 20) and not blocks.can_grow(seq, 21)
    blocks.grow(seq, 9)
    assert len(seq.block_table) == 3 and blocks.num_used_blocks == 3
    blocks.grow(seq, 12)
    assert len(seq.block_table) == 3
    blocks.free(seq)
    assert blocks.num_free_blocks == 5 and seq.block_table == []


def test_prefix_cache_shares_computed_blocks_and_keeps_accounting_exact():
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    first = make_seq(0, 10)
    scheduler.add(first)
    complete(scheduler.schedule(max_seqs=8), blocks)  # 10 prompt tokens computed: blocks 0 and 1 are full
    second = make_seq(1, 11)  # same first 10 tokens, one more
    scheduler.add(second)
    [item] = [b for b in scheduler.schedule(max_seqs=8) if b.seq is second]
    assert (item.start, item.end) == (8, 11)  # two shared blocks, the rest computed
    assert second.block_table[:2] == first.block_table[:2] and blocks.num_cache_hits == 2
    scheduler.finish(first, "stop")
    scheduler.finish(second, "abort")
    assert blocks.num_free_blocks == 8
    third = make_seq(2, 10)  # the freed blocks still hold the prefix
    scheduler.add(third)
    [item] = scheduler.schedule(max_seqs=8)
    assert item.start == 8 and blocks.num_cache_hits == 4
    scheduler.finish(third, "stop")
    assert blocks.num_free_blocks == 8


def test_prefix_cache_never_hands_out_the_whole_prompt():
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.add(make_seq(0, 8))
    complete(scheduler.schedule(max_seqs=8), blocks)
    twin = make_seq(1, 8)
    scheduler.add(twin)
    [item] = [b for b in scheduler.schedule(max_seqs=8) if b.seq is twin]
    assert (item.start, item.end) == (4, 8)  # the last block is recomputed for the first token's logits
