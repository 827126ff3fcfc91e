"""A host's budget and what it leaves a worker's KV cache (hexcore/hardware.py)."""

from __future__ import annotations

import pytest

from hexcore.config import Device
from hexcore.hardware import HostBudget, kv_cache_budget_bytes

CPU = Device.parse("cpu")


def test_the_budget_defaults_to_the_whole_host_and_refuses_nonsense():
    whole = HostBudget.of_this_host()
    assert whole.num_cpus >= 1 and whole.memory_bytes > 1e8
    assert HostBudget.of_this_host(num_cpus=1, memory_gb=0.5) == HostBudget(1, 500_000_000)
    with pytest.raises(ValueError, match="num_cpus must be at least 1"):
        HostBudget.of_this_host(num_cpus=0)
    with pytest.raises(ValueError, match="memory_gb must be positive"):
        HostBudget.of_this_host(memory_gb=0)


def test_cores_are_shared_by_the_hosts_workers():
    assert HostBudget(8, 10**9).num_threads(3) == 2
    assert HostBudget(2, 10**9).num_threads(4) == 1  # at least one each


def test_a_cpu_workers_kv_cache_gets_a_fraction_of_its_share_but_never_more_than_its_weights_leave():
    budget = HostBudget(2, 1_000_000_000)
    assert kv_cache_budget_bytes(CPU, 0.2, budget, 2, weights_bytes=100_000_000) == 100_000_000  # 0.2 x 500 MB
    assert kv_cache_budget_bytes(CPU, 0.2, budget, 2, weights_bytes=450_000_000) == 50_000_000  # what is left
    with pytest.raises(ValueError, match=r"share of this host's memory budget is 0.500 GB .* weights alone take 0.600 GB"):
        kv_cache_budget_bytes(CPU, 0.2, budget, 2, weights_bytes=600_000_000)
