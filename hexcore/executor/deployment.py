"""From a deployment file to the worker specs of each replica: resolve the model, check the layout
against it, size the KV cache and the threads, assign world ranks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hexcore.config import DeploymentConfig, Device, ReplicaSpec, check_against_model
from hexcore.hardware import default_num_threads, distributed_backend, kv_cache_budget_bytes
from hexcore.model.kv_cache import bytes_per_block
from hexcore.executor.specs import PipelineStage, WorkerSpec
from hexcore.model.llama import LlamaDims, read_model_config
from hexcore.model.files import default_model_name, resolve_model_dir


@dataclass(frozen=True)
class ResolvedReplica:
    name: str
    spec: ReplicaSpec
    workers: list[WorkerSpec]
    num_kv_blocks: int
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
            lines.append(f"replica {plan.name}: {stages}; {plan.num_kv_blocks} KV blocks "
                         f"of {self.config.engine.block_size} tokens")
        return "\n".join(lines)


def _pipeline(spec: ReplicaSpec) -> tuple[PipelineStage, ...]:
    stages, first_layer, rank = [], 0, 0
    for stage in spec.stages:
        stages.append(PipelineStage(first_layer, stage.layers, tuple(range(rank, rank + stage.tp))))
        first_layer += stage.layers
        rank += stage.tp
    return tuple(stages)


def _num_kv_blocks(config: DeploymentConfig, spec: ReplicaSpec, dims: LlamaDims, max_model_len: int,
                   num_local_cpu_workers: int) -> int:
    engine = config.engine
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    fits = []
    for stage in spec.stages:
        per_block = bytes_per_block(stage.layers, dims.num_kv_heads // stage.tp, dims.head_dim,
                                    engine.block_size, config.dtype)
        for device in stage.parsed_devices:
            fits.append(kv_cache_budget_bytes(device, engine.kv_cache_memory_fraction, num_local_cpu_workers) // per_block)
    most_useful = engine.max_num_seqs * -(-max_model_len // engine.block_size)
    return max(1, min(min(fits), most_useful))


def resolve(config: DeploymentConfig) -> ResolvedDeployment:
    model_dir = resolve_model_dir(config.model)
    dims, _rope = read_model_config(model_dir)
    check_against_model(config, dims.num_layers, dims.num_heads, dims.num_kv_heads)
    max_model_len = config.max_model_len or dims.max_position_embeddings
    if max_model_len > dims.max_position_embeddings:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                         f"{dims.max_position_embeddings}")
    all_devices = [d for r in config.replicas for s in r.stages for d in s.parsed_devices]
    num_cpu_workers = sum(1 for d in all_devices if not d.is_cuda)
    num_threads = config.engine.num_threads_per_worker or default_num_threads(len(all_devices))
    replicas = []
    for name, spec in zip(config.replica_names, config.replicas):
        stages = _pipeline(spec)
        num_blocks = _num_kv_blocks(config, spec, dims, max_model_len, num_cpu_workers)
        devices = [d for stage in spec.stages for d in stage.devices]
        backend = distributed_backend([Device.parse(d) for d in devices])
        workers = [WorkerSpec(replica=name, rank=rank, device=device, stages=stages, model_dir=model_dir,
                              dtype=config.dtype, max_model_len=max_model_len, num_kv_blocks=num_blocks,
                              block_size=config.engine.block_size, num_threads=num_threads, backend=backend,
                              node=config.node_of(Device.parse(device)))
                   for rank, device in enumerate(devices)]
        micro_batches = config.engine.num_micro_batches or len(spec.stages)
        replicas.append(ResolvedReplica(name, spec, workers, num_blocks, micro_batches))
    model_name = config.served_model_name or default_model_name(config.model)
    return ResolvedDeployment(config, model_dir, model_name, dims, max_model_len, replicas)
