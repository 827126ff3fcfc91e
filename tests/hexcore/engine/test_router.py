"""Routing across replicas by least expected wait, weighted by capacity."""

from __future__ import annotations

from types import SimpleNamespace

from hexcore.engine.block_manager import BlockManager
from hexcore.engine.replica import ReplicaMetrics
from hexcore.engine.router import Router
from hexcore.sampling_params import SamplingParams
from hexcore.engine.scheduler import Scheduler
from hexcore.engine.sequence import Sequence


def replica(name: str, predicted: float | None = None, num_blocks: int = 100, is_up: bool = True):
    blocks = BlockManager(num_blocks, 16)
    spec = SimpleNamespace(predicted_throughput_rps=predicted)
    return SimpleNamespace(name=name, plan=SimpleNamespace(spec=spec), block_manager=blocks,
                           scheduler=Scheduler(blocks, 64, 512), metrics=ReplicaMetrics(), is_up=is_up)


def request(seq_id: int, num_prompt: int = 10, max_tokens: int = 10) -> list[Sequence]:
    return [Sequence(seq_id, f"r{seq_id}", 0, [1] * num_prompt, SamplingParams(max_tokens=max_tokens), 0,
                     max_tokens)]


def route(router: Router, num_requests: int) -> dict[str, int]:
    counts = {r.name: 0 for r in router.replicas}
    for i in range(num_requests):
        seqs = request(i)
        chosen = router.choose(seqs)
        chosen.scheduler.add(seqs[0])
        counts[chosen.name] += 1
    return counts


def test_requests_split_in_proportion_to_predicted_throughput():
    router = Router([replica("fast", predicted=3.0), replica("slow", predicted=1.0)])
    assert route(router, 40) == {"fast": 30, "slow": 10}  # the slow replica is used, not starved


def test_without_predictions_replicas_share_equally():
    router = Router([replica("a"), replica("b", predicted=2.0)])  # predictions only count when complete
    assert route(router, 10) == {"a": 5, "b": 5}


def test_measured_throughput_is_used_once_every_replica_has_run():
    fast, slow = replica("fast"), replica("slow")
    for r, tokens in ((fast, 4000), (slow, 1000)):
        r.metrics.num_steps, r.metrics.busy_seconds, r.metrics.num_generated_tokens = 10, 1.0, tokens
    assert route(Router([fast, slow]), 50) == {"fast": 40, "slow": 10}


def test_a_request_goes_only_where_its_kv_cache_fits():
    small, large = replica("small", predicted=10.0, num_blocks=1), replica("large", predicted=1.0)
    assert Router([small, large]).choose(request(0, num_prompt=20)).name == "large"


def test_a_replica_that_is_down_gets_no_request_and_none_up_means_none():
    up, down = replica("up", predicted=1.0), replica("down", predicted=10.0, is_up=False)
    assert route(Router([up, down]), 5) == {"up": 5, "down": 0}
    assert Router([down]).choose(request(0)) is None
