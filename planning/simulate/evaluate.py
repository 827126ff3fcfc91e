"""Evaluate a deployment on a cluster: check it against the model and memory, then simulate it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hexcore.config import DeploymentConfig, check_against_model, load_config
from planning.inputs.cluster import Cluster
from planning.inputs.models import ModelSpec
from planning.placement import DeploymentPlan, plan_from_config
from planning.cost.replica_cost import ReplicaCost, replica_cost
from planning.simulate.capacity import max_sustainable_rate, saturated_throughput_rps
from planning.simulate.simulator import Predicted, simulate
from planning.inputs.workload import WorkloadSpec


@dataclass(frozen=True)
class Evaluation:
    predicted: Predicted
    replica_throughputs_rps: tuple[float, ...]  # saturated, simulated (planning.simulate.capacity)
    max_sustainable_rate_rps: float  # at the workload's deadline


def replica_costs(cluster: Cluster, model: ModelSpec, config: DeploymentConfig, plan: DeploymentPlan) -> list[ReplicaCost]:
    """Cost models of every replica; ValueError naming the replica when one does not fit in memory."""
    costs = []
    for name, replica in zip(config.replica_names, plan.replicas):
        try:
            costs.append(replica_cost(cluster, model, replica, config.engine))
        except ValueError as err:
            raise ValueError(f"replica {name!r} does not fit in memory: {err}") from None
    return costs


def evaluate_deployment(
    cluster: Cluster, model: ModelSpec, config: DeploymentConfig, workload: WorkloadSpec
) -> Evaluation:
    """Check the deployment (layers, heads, device names, memory) and simulate it under the workload."""
    check_against_model(config, model.num_layers, model.num_heads, model.num_kv_heads)
    model = model.with_dtype(config.dtype)
    costs = replica_costs(cluster, model, config, plan_from_config(config, cluster))
    capacities = [saturated_throughput_rps(c, workload) for c in costs]
    return Evaluation(simulate(costs, workload, capacities=capacities), tuple(capacities),
                      max_sustainable_rate(costs, workload, capacities))


def simulate_plan(
    cluster: Cluster, model: ModelSpec, deployment: DeploymentConfig | str | Path, workload: WorkloadSpec
) -> Predicted:
    """The predicted serving figures of a deployment (a DeploymentConfig or a deployment file path)."""
    config = deployment if isinstance(deployment, DeploymentConfig) else load_config(deployment)
    return evaluate_deployment(cluster, model, config, workload).predicted
