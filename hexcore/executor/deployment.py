"""From a deployment file to the worker specs of each replica: resolve the model, check the layout
against it, assign world ranks. Each worker sizes its threads and KV cache on its own host when it
starts (hexcore/worker/main.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hexcore.config import DeploymentConfig, Device, EngineSpec, ReplicaSpec, check_against_model
from hexcore.hardware import HostBudget, distributed_backend
from hexcore.executor.specs import PipelineStage, WorkerSpec
from hexcore.model.llama import LlamaDims, read_model_config
from hexcore.model.files import default_model_name, resolve_model_dir


@dataclass(frozen=True)
class ResolvedReplica:
    name: str
    spec: ReplicaSpec
    workers: list[WorkerSpec]
    num_kv_blocks: int | None  # as configured; None: what its workers' memory fits, found at each start
    max_num_kv_blocks: int  # more would never be used
    num_micro_batches: int


@dataclass(frozen=True)
class ResolvedDeployment:
    config: DeploymentConfig
    model_dir: Path
    model_name: str
    dims: LlamaDims
    max_model_len: int
    replicas: list[ResolvedReplica]

    def describe(self) -> str:
        lines = [f"model {self.model_name} ({self.model_dir}), {self.dims.num_layers} layers, "
                 f"dtype {self.config.dtype}, max_model_len {self.max_model_len}"]
        for plan in self.replicas:
            stages = " -> ".join(f"[TP{s.tp}: {s.layers} layers on {', '.join(s.devices)}]" for s in plan.spec.stages)
            blocks = plan.num_kv_blocks or "memory-sized"
            lines.append(f"replica {plan.name}: {stages}; {blocks} KV blocks of {self.config.engine.block_size} tokens")
        return "\n".join(lines)


def _pipeline(spec: ReplicaSpec) -> tuple[PipelineStage, ...]:
    stages, first_layer, rank = [], 0, 0
    for stage in spec.stages:
        stages.append(PipelineStage(first_layer, stage.layers, tuple(range(rank, rank + stage.tp))))
        first_layer += stage.layers
        rank += stage.tp
    return tuple(stages)


def most_useful_kv_blocks(engine: EngineSpec, max_model_len: int) -> int:
    """Blocks beyond these would never be used: every running sequence at max_model_len."""
    return engine.max_num_seqs * -(-max_model_len // engine.block_size)


def resolve(config: DeploymentConfig) -> ResolvedDeployment:
    model_dir = resolve_model_dir(config.model)
    dims, _rope = read_model_config(model_dir)
    check_against_model(config, dims.num_layers, dims.num_heads, dims.num_kv_heads)
    max_model_len = config.max_model_len or dims.max_position_embeddings
    if max_model_len > dims.max_position_embeddings:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                         f"{dims.max_position_embeddings}")
    engine = config.engine
    num_local_workers = Counter(config.node_of(d) for r in config.replicas for s in r.stages for d in s.parsed_devices)
    head_budget = HostBudget.of_this_host(config.cluster.num_cpus, config.cluster.memory_gb)
    replicas = []
    for name, spec in zip(config.replica_names, config.replicas):
        stages = _pipeline(spec)
        devices = [d for stage in spec.stages for d in stage.devices]
        backend = distributed_backend([Device.parse(d) for d in devices])
        workers = []
        for rank, device in enumerate(devices):
            node = config.node_of(Device.parse(device))
            workers.append(WorkerSpec(
                replica=name, rank=rank, device=device, stages=stages,
                model=config.model if node is not None else str(model_dir), dtype=config.dtype,
                max_model_len=max_model_len, block_size=engine.block_size,
                kv_cache_memory_fraction=engine.kv_cache_memory_fraction, num_local_workers=num_local_workers[node],
                num_threads=engine.num_threads_per_worker, backend=backend, node=node,
                host_budget=head_budget if node is None else None))  # a node's agent sets its own
        micro_batches = engine.num_micro_batches or len(spec.stages)
        replicas.append(ResolvedReplica(name, spec, workers, engine.num_kv_blocks,
                                        most_useful_kv_blocks(engine, max_model_len), micro_batches))
    model_name = config.served_model_name or default_model_name(config.model)
    return ResolvedDeployment(config, model_dir, model_name, dims, max_model_len, replicas)
