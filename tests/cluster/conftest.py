"""``emulated_cluster``: a factory fixture that builds EmulatedClusters, skips where they cannot be built, and
always tears down what it built (also when the test fails)."""

from __future__ import annotations

import pytest

from planning.emulation.harness import EmulatedCluster, skip_reason


@pytest.fixture
def emulated_cluster():
    """``emulated_cluster(hosts, *, need_cpu_quota=False, **kwargs) -> EmulatedCluster`` (already started).

    Skips the test with the reason if namespaces / tc htb (or, with ``need_cpu_quota`` or a ``cpu_quota=``
    argument, cgroup v1 cpu quotas) are not available here.
    """
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[EmulatedCluster] = []

    def make(hosts, *, need_cpu_quota: bool = False, **kwargs) -> EmulatedCluster:
        if need_cpu_quota or kwargs.get("cpu_quota"):
            quota_reason = skip_reason(cpu_quota=True)
            if quota_reason is not None:
                pytest.skip(quota_reason)
        cluster = EmulatedCluster(hosts, **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    errors = []
    for cluster in reversed(made):
        try:
            cluster.close()
        except Exception as exc:  # noqa: BLE001 - close them all, then fail
            errors.append(exc)
    if errors:
        raise errors[0]
