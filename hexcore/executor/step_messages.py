"""What each rank of a replica receives per step: the driver's mirror of what the replica's workers
already know, and the step messages built from it.

Every rank learns a sequence's block table once and then only the block ids appended to it; the
sampling rank (the last stage's TP leader) learns its sampling parameters once, when it first samples
it, and then only the output tokens since (and those only when penalties or a grammar need them).
Token ids go to the first stage only; which rows are sampled and the prompt scoring, to the last stage
only. A sequence whose blocks are freed (finished, aborted, preempted) is forgotten here and on every
rank: should it come back, it is new. One mirror belongs to one start of the workers: new workers know
nothing, and come with a new mirror (executor/replica_workers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from hexcore.executor.messages import SeqSampling, SeqStart, StepBatch, StepMessage, StepSampling
from hexcore.executor.specs import WorkerSpec


@dataclass(frozen=True)
class Role:
    """What a rank needs of a step: ranks with the same role receive the same message."""

    is_first: bool  # embeds the token ids
    is_last: bool  # scores the sampled rows (every TP rank joins the logits gather)
    is_sampling: bool  # the last stage's TP leader: samples

    @classmethod
    def of(cls, spec: WorkerSpec) -> "Role":
        stage_index, stage = spec.stage_index, spec.stage
        is_last = stage_index == len(spec.stages) - 1
        return cls(stage_index == 0, is_last, is_last and spec.rank == stage.ranks[0])


class StepMessages:
    """The step messages of one start of a replica's workers, and the mirror of what they know."""

    def __init__(self, roles: list[Role]):
        self.roles = list(dict.fromkeys(roles))  # distinct, in rank order
        self._num_blocks: dict[int, int] = {}  # by seq id: the blocks of its table every rank holds
        self._num_outputs: dict[int, int] = {}  # by seq id, once the sampling rank has its SeqStart: its output ids there
        self._dropped: list[int] = []

    def forget(self, seq_ids: list[int]) -> None:
        """These sequences' blocks were freed: the next step tells every rank to drop them."""
        for seq_id in seq_ids:
            if self._num_blocks.pop(seq_id, None) is not None:
                self._num_outputs.pop(seq_id, None)
                self._dropped.append(seq_id)

    def build(self, batch: StepBatch) -> dict[Role, StepMessage]:
        """The step's message for each role, and the mirror updated as if every rank had received its own."""
        new_block_ids = []
        for seq_id, table in zip(batch.seq_ids, batch.block_tables):
            known = self._num_blocks.get(seq_id, 0)
            assert known <= len(table), f"sequence {seq_id}'s block table shrank without being freed"
            new_block_ids.append(table[known:])
            self._num_blocks[seq_id] = len(table)
        common = dict(step_id=batch.step_id, seq_ids=batch.seq_ids, query_lens=batch.query_lens,
                      context_lens=batch.context_lens, new_block_ids=new_block_ids, dropped_seq_ids=self._dropped)
        self._dropped = []
        last = {}
        if any(role.is_last for role in self.roles):
            last = dict(unsampled=[i for i, is_sampled in enumerate(batch.sampled) if not is_sampled],
                        prompt_scoring=batch.prompt_scoring if any(batch.prompt_scoring) else None)
        sampling = self._sampling(batch) if any(role.is_sampling for role in self.roles) else None
        return {role: StepMessage(**common, token_ids=batch.token_ids if role.is_first else None,
                                  **(last if role.is_last else {}), sampling=sampling if role.is_sampling else None)
                for role in self.roles}

    def _sampling(self, batch: StepBatch) -> StepSampling:
        new_seqs, new_output_ids, banned = {}, {}, {}
        for seq_id, spec, context_len in zip(batch.seq_ids, batch.sampling, batch.context_lens):
            if spec is None:
                continue
            known = self._num_outputs.get(seq_id)
            if known is None:
                new_seqs[seq_id] = _start(spec, context_len)
                known = 0
            if len(spec.output_token_ids) > known:
                new_output_ids[seq_id] = list(spec.output_token_ids[known:])
            self._num_outputs[seq_id] = len(spec.output_token_ids)
            if spec.banned_token_ids:
                banned[seq_id] = spec.banned_token_ids
        return StepSampling(new_seqs, new_output_ids, banned)


def _start(spec: SeqSampling, context_len: int) -> SeqStart:
    """A sampled row ends its sequence's known tokens: prompt + the outputs so far."""
    return SeqStart(spec.params, spec.seed, context_len - spec.num_generated, spec.prompt_token_ids)
