"""Who sends hidden states to whom between consecutive stages whose TP degrees may differ.

Every rank of a stage ends with the full hidden state (the row-parallel all-reduce replicates it), and
every rank of the next stage needs exactly that. Rank k of stage j+1 receives from rank k mod t_j of
stage j, so the sends are spread over the senders and each receiver gets one copy, nothing more.
3 -> 1: rank 0 sends to rank 0. 1 -> 2: rank 0 sends to both. 2 -> 3: ranks 0, 1, 0 send.
"""

from __future__ import annotations

from hexcore.executor.specs import PipelineStage


def source_rank(prev: PipelineStage, stage: PipelineStage, tp_rank: int) -> int:
    """The world rank from which rank `tp_rank` of `stage` receives its input."""
    return prev.ranks[tp_rank % prev.tp]


def destination_ranks(stage: PipelineStage, next_stage: PipelineStage, tp_rank: int) -> list[int]:
    """The world ranks of `next_stage` to which rank `tp_rank` of `stage` sends its output."""
    return [rank for k, rank in enumerate(next_stage.ranks) if k % stage.tp == tp_rank]
