"""What a worker keeps of each sequence between steps, so that the driver sends it only increments
(executor/step_messages.py): its block table, and on the sampling rank its SeqStart and the output
tokens its penalties or grammar need. From these and a StepMessage it rebuilds the rank's StepBatch."""

from __future__ import annotations

from dataclasses import dataclass, field

from hexcore.executor.messages import SeqSampling, SeqStart, StepBatch, StepMessage


@dataclass
class _Seq:
    block_table: list[int] = field(default_factory=list)
    start: SeqStart | None = None  # on the sampling rank, once it has sampled the sequence
    output_token_ids: list[int] = field(default_factory=list)  # on the sampling rank, when sent


class SeqStates:
    def __init__(self):
        self._seqs: dict[int, _Seq] = {}

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    def step(self, message: StepMessage) -> StepBatch:
        """Apply the message's increments and return the step as this rank runs it."""
        for seq_id in message.dropped_seq_ids:
            del self._seqs[seq_id]
        seqs = []
        for seq_id, new_block_ids in zip(message.seq_ids, message.new_block_ids):
            seq = self._seqs.get(seq_id)
            if seq is None:
                seq = self._seqs[seq_id] = _Seq()
            seq.block_table.extend(new_block_ids)
            seqs.append(seq)
        num_seqs, is_last = len(seqs), message.unsampled is not None
        sampled = [True] * num_seqs if is_last else []
        for i in message.unsampled or ():
            sampled[i] = False
        sampling = [None] * num_seqs if is_last else []
        if message.sampling is not None:
            sampling = self._sampling(message, seqs, sampled)
        prompt_scoring = message.prompt_scoring or ([None] * num_seqs if is_last else [])
        return StepBatch(message.step_id, message.seq_ids, message.token_ids or [], message.query_lens,
                         message.context_lens, [list(seq.block_table) for seq in seqs], sampled, sampling, prompt_scoring)

    def _sampling(self, message: StepMessage, seqs: list[_Seq], sampled: list[bool]) -> list[SeqSampling | None]:
        increments = message.sampling
        specs: list[SeqSampling | None] = []
        for seq_id, seq, context_len, is_sampled in zip(message.seq_ids, seqs, message.context_lens, sampled):
            if not is_sampled:
                specs.append(None)
                continue
            if seq_id in increments.new_seqs:
                seq.start, seq.output_token_ids = increments.new_seqs[seq_id], []
            seq.output_token_ids.extend(increments.new_output_ids.get(seq_id, ()))
            start = seq.start
            num_generated = context_len - start.num_prompt_tokens
            assert not seq.output_token_ids or len(seq.output_token_ids) == num_generated, (seq_id, num_generated)
            specs.append(SeqSampling(start.params, start.seed, num_generated,
                                     increments.banned_token_ids.get(seq_id, ()), tuple(seq.output_token_ids),
                                     start.prompt_token_ids, seq_id))
        return specs
