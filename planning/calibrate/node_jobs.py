"""What `hexgen calibrate --nodes` has each node measure on its own host: agent jobs (hexcore/cluster/jobs.py
lists these two types as the only ones an agent runs). A job runs in a child process of the node's agent
(or of the head, for the head's own node) and returns a small result to the head."""

from __future__ import annotations

from dataclasses import dataclass

from planning.calibrate.pair import PairTiming


@dataclass(frozen=True)
class LinkBudget:
    target_s: float  # the largest message's one-way time
    num_reps: int
    num_batches: int


QUICK_LINK = LinkBudget(target_s=0.05, num_reps=3, num_batches=3)
FULL_LINK = LinkBudget(target_s=0.2, num_reps=5, num_batches=5)


@dataclass(frozen=True)
class DeviceProfile:
    """A node's device spec file, rendered on the node (its comments describe that host)."""

    text: str


@dataclass(frozen=True)
class DeviceProfileJob:
    """Measure this host as one device: a worker at `num_threads` torch threads (planning/calibrate/command.py)."""

    device_name: str
    command: str  # the calibration's command line, for the file's header
    dtype: str
    num_threads: int
    memory_gb: float
    is_quick: bool

    def run(self) -> DeviceProfile:
        from planning.calibrate.command import FULL, QUICK, measure_device, render

        calibration = measure_device(self.dtype, self.num_threads, self.memory_gb, QUICK if self.is_quick else FULL)
        return DeviceProfile(render(calibration, self.device_name, command=self.command,
                                    memory_note="the node's memory budget (its RAM, or `hexgen node --memory-gb`)"))


@dataclass(frozen=True)
class LinkEndpointJob:
    """One end of a node pair's gloo link (planning/calibrate/pair.py): rank 0 returns the timings."""

    store_address: str
    store_prefix: str
    rank: int
    budget: LinkBudget

    def run(self) -> PairTiming | None:
        from planning.calibrate.pair import time_pair

        return time_pair(self.store_address, self.store_prefix, self.rank, self.budget.target_s,
                         self.budget.num_reps, self.budget.num_batches)
