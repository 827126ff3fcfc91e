"""Who sends hidden states to whom between stages of different TP degrees: every rank of the next
stage receives exactly one copy, and the sends are spread over the senders."""

from __future__ import annotations

import pytest

from hexcore.executor.specs import PipelineStage
from hexcore.model.pipeline import destination_ranks, source_rank


def stage(first_rank: int, tp: int) -> PipelineStage:
    return PipelineStage(first_layer=0, num_layers=1, ranks=tuple(range(first_rank, first_rank + tp)))


@pytest.mark.parametrize("tp_from, tp_to, expected_sources", [
    (3, 1, [0]),
    (1, 2, [0, 0]),
    (2, 3, [0, 1, 0]),
    (2, 2, [0, 1]),
])
def test_each_receiver_has_one_sender_and_senders_agree(tp_from, tp_to, expected_sources):
    sender, receiver = stage(0, tp_from), stage(tp_from, tp_to)
    sources = [source_rank(sender, receiver, k) for k in range(tp_to)]
    assert sources == expected_sources
    sent = {k: destination_ranks(sender, receiver, k) for k in range(tp_from)}
    for k, rank in enumerate(receiver.ranks):  # the sender's view matches the receiver's
        assert [s for s, dests in sent.items() if rank in dests] == [sources[k]]
