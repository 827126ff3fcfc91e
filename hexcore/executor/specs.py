"""What a worker process is started with: its place in its replica's pipeline and world, and what it
loads. Frozen, model-agnostic: the worker reads the model's own config from `model_dir`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    model_dir: Path
    dtype: str
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    num_threads: int
    backend: str  # gloo | nccl, chosen for the whole replica by hexcore.hardware
    node: str | None = None  # the host it runs on (None: the head's)
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
