"""Continuous batching for one replica: waiting and running queues over a block manager.

Each call to `schedule` forms one micro-batch from sequences that are not already in flight:
running sequences first (their next token, or the next chunk of their prompt), oldest first, then
waiting ones while the token budget and the blocks last. A long prompt is cut into chunks of at most
the remaining budget, so it never stalls the decodes. When blocks run out, the youngest running
sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hexcore.engine.block_manager import BlockManager
from hexcore.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """A sequence's share of a step: its tokens [start, end) go through the model."""

    seq: Sequence
    start: int
    end: int
    completes_known_tokens: bool  # after this chunk every known token is cached: sample the next one

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_resumed(self, seqs: list[Sequence]) -> None:
        """Sequences moved from a failed replica: ahead of every waiting one, as the oldest."""
        self.waiting.extendleft(reversed(seqs))

    def schedule(self, max_seqs: int) -> list[ScheduledSeq]:
        """A micro-batch of at most `max_seqs` sequences not already in flight."""
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        for seq in list(self.running):
            if len(batch) >= max_seqs or budget == 0:
                break
            if seq.is_in_flight or seq.status is not SequenceStatus.RUNNING:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, seq.num_computed_tokens + num_new):
                batch.append(self._take(seq, num_new))
                budget -= num_new
        while self.waiting and budget and len(batch) < max_seqs and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.wants_prompt_logprobs:  # scoring needs every prompt position computed
                self.block_manager.reuse_cached_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_grow(seq, seq.num_computed_tokens + num_new):
                self._unadmit(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(self._take(seq, num_new))
            budget -= num_new
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _take(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        self.block_manager.grow(seq, end)
        seq.is_in_flight = True
        return ScheduledSeq(seq, start, end, completes_known_tokens=end == seq.num_tokens)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the youngest idle running sequences until `seq` fits; False if it cannot now."""
        while not self.block_manager.can_grow(seq, num_tokens):
            victims = [s for s in self.running if not s.is_in_flight and s is not seq]
            if not victims:
                return False
            self._preempt(victims[-1])
        return True

    def _unadmit(self, seq: Sequence) -> None:
        """Give back the cached blocks a waiting sequence was given: it stays waiting, holding nothing."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self._unadmit(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
