"""What a worker process is started with: its place in its replica's pipeline and world, and what it
loads. Frozen, model-agnostic: the worker resolves `model` on its own host and reads the model's
config there. Its KV cache is sized after it has loaded its weights (two-phase start, messages.py)."""

from __future__ import annotations

from dataclasses import dataclass

from hexcore.hardware import HostBudget


@dataclass(frozen=True)
class PipelineStage:
    """One stage of a replica: its consecutive layers and the world ranks of its TP group."""

    first_layer: int
    num_layers: int
    ranks: tuple[int, ...]  # world ranks of the stage's devices, by TP rank

    @property
    def tp(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to build its shard and join its replica."""

    replica: str
    rank: int  # in the replica's torch.distributed world
    device: str  # as written in the deployment file
    stages: tuple[PipelineStage, ...]
    model: str  # resolved on the worker's own host (hexcore/model/files.py): a path must exist there
    dtype: str
    max_model_len: int
    block_size: int
    kv_cache_memory_fraction: float
    num_local_workers: int  # workers of the deployment on its host, sharing the host's budget
    num_threads: int | None  # None: its share of the host's cores
    backend: str  # gloo | nccl, chosen for the whole replica by hexcore.hardware
    node: str | None = None  # the host it runs on (None: the head's)
    host_budget: HostBudget | None = None  # set by whoever starts the process on that host
    store_address: str = ""  # host:port of the driver's c10d store (executor/rendezvous.py): set at each start
    store_prefix: str = ""  # this start's keys in it

    @property
    def world_size(self) -> int:
        return sum(stage.tp for stage in self.stages)

    @property
    def stage_index(self) -> int:
        return next(j for j, stage in enumerate(self.stages) if self.rank in stage.ranks)

    @property
    def stage(self) -> PipelineStage:
        return self.stages[self.stage_index]

    @property
    def label(self) -> str:
        return f"replica {self.replica!r} stage {self.stage_index} rank {self.rank} (device {self.device})"
