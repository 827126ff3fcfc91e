"""A deployment placed on a cluster, and its conversion to and from the deployment file.

Devices are (node index, local index) pairs. In the deployment file they are named `NODE/cuda:I`
(`cpu` or `NODE/cpu` for cpu-kind devices, whose workers are numbered in order of appearance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hexcore.config import DeploymentConfig, Device, EngineSpec, ReplicaSpec, StageSpec
from planning.inputs.cluster import Cluster

DeviceRef = tuple[int, int]  # (node index, device index on the node)


@dataclass(frozen=True)
class StagePlan:
    devices: tuple[DeviceRef, ...]
    layers: int

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(node for node, _ in self.devices))


@dataclass(frozen=True)
class ReplicaPlan:
    stages: tuple[StagePlan, ...]

    @property
    def devices(self) -> list[DeviceRef]:
        return [device for stage in self.stages for device in stage.devices]


@dataclass(frozen=True)
class DeploymentPlan:
    replicas: tuple[ReplicaPlan, ...]

    def to_config(self, cluster: Cluster, model: str, dtype: str, engine: EngineSpec | None = None,
                  throughputs_rps: list[float] | None = None) -> DeploymentConfig:
        """The deployment file; with predicted throughputs, the engine's router weighs replicas by them."""
        throughputs = throughputs_rps or [None] * len(self.replicas)
        replicas = [
            ReplicaSpec(
                name=f"r{i}",
                stages=[StageSpec(devices=[device_name(cluster, d) for d in s.devices], layers=s.layers) for s in r.stages],
                predicted_throughput_rps=round(rps, 4) if rps else None,
            )
            for i, (r, rps) in enumerate(zip(self.replicas, throughputs))
        ]
        return DeploymentConfig(model=model, dtype=dtype, replicas=replicas, engine=engine or EngineSpec())


def device_name(cluster: Cluster, device: DeviceRef) -> str:
    node = cluster.nodes[device[0]]
    if node.device.kind == "cpu":
        return "cpu" if len(cluster.nodes) == 1 else f"{node.name}/cpu"
    return f"{node.name}/cuda:{device[1]}"


def plan_from_config(config: DeploymentConfig, cluster: Cluster) -> DeploymentPlan:
    """Match a deployment's device names to cluster nodes (by node name and cuda index)."""
    used: set[DeviceRef] = set()
    next_cpu: dict[int, int] = {}
    replicas = []
    for replica_name, replica in zip(config.replica_names, config.replicas):
        stages = []
        for j, stage in enumerate(replica.stages):
            refs = []
            for name in stage.devices:
                ref = _resolve(Device.parse(name), name, cluster, next_cpu)
                if ref in used:
                    raise ValueError(f"replica {replica_name!r}, stage {j}: device {name!r} is used twice")
                used.add(ref)
                refs.append(ref)
            stages.append(StagePlan(tuple(refs), stage.layers))
        replicas.append(ReplicaPlan(tuple(stages)))
    return DeploymentPlan(tuple(replicas))


def _resolve(device: Device, name: str, cluster: Cluster, next_cpu: dict[int, int]) -> DeviceRef:
    if device.node is not None:
        node = cluster.nodes[cluster.node_index(device.node)]
    elif len(cluster.nodes) == 1:
        node = cluster.nodes[0]
    else:
        raise ValueError(f"device {name!r} names no node, but the cluster has several: use 'NODE/{name}'")
    if device.kind != node.device.kind:
        raise ValueError(f"device {name!r}: node {node.name!r} holds {node.device.kind} devices ({node.gpu})")
    if device.is_cuda:
        index = device.index
    else:
        index = next_cpu.get(node.index, 0)
        next_cpu[node.index] = index + 1
    if index >= node.count:
        raise ValueError(f"device {name!r}: node {node.name!r} has only {node.count} devices")
    return (node.index, index)


def write_plan_file(path: str | Path, config: DeploymentConfig, header: list[str], model_comment: str | None = None) -> None:
    """Write the deployment file with `header` lines as a leading comment."""
    raw = config.model_dump(mode="json", exclude_defaults=True)
    raw = {"model": config.model, "dtype": config.dtype, **raw}
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120)
    if model_comment:
        first, rest = text.split("\n", 1)
        text = f"{first}  # {model_comment}\n{rest}"
    lines = [f"# {line}" if line else "#" for line in header]
    Path(path).write_text("\n".join(lines) + "\n" + text)


def describe_shapes(plan: DeploymentPlan) -> str:
    """Replicas as counts of their TP shapes, e.g. '4x TP4, 2x TP8/TP8'."""
    shapes: dict[str, int] = {}
    for replica in plan.replicas:
        shape = "TP" + "/".join(str(s.tp) for s in replica.stages)
        shapes[shape] = shapes.get(shape, 0) + 1
    return ", ".join(f"{n}x {shape}" for shape, n in sorted(shapes.items(), key=lambda kv: -kv[1]))
