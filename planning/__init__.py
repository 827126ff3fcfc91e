"""Planning: the cost model, the DP + genetic scheduler and the serving simulator behind `hexgen plan`.

Python API (the CLI in planning/plan_command.py is a thin layer over it):
- load_cluster / load_model / load_workload: read the inputs;
- search(cluster, model, workload, SearchParams(...)) -> SearchResult (plan, predicted figures);
- simulate_plan(cluster, model, deployment, workload) -> Predicted, for any deployment file or config;
- StageCost: the explicit per-step time model of one stage (compare with measured step times);
- load_device_file: a calibrated device spec (hexgen calibrate) for `gpus:` entries or cost models.
"""

from planning.inputs.cluster import Cluster, load_cluster
from planning.cost.stage_cost import StageCost
from planning.inputs.catalog import GPU_CATALOG, DeviceSpec, LinkSpec, load_device_file
from planning.simulate.evaluate import evaluate_deployment, replica_costs, simulate_plan
from planning.search.genetic import SearchParams, exhaustive, search
from planning.inputs.models import BUILTIN_MODELS, ModelSpec, load_model
from planning.simulate.simulator import Predicted, simulate
from planning.inputs.workload import WorkloadSpec, load_workload

__all__ = [
    "BUILTIN_MODELS", "GPU_CATALOG", "Cluster", "DeviceSpec", "LinkSpec", "ModelSpec", "Predicted", "SearchParams",
    "StageCost", "WorkloadSpec", "evaluate_deployment", "exhaustive", "load_cluster", "load_device_file",
    "load_model", "load_workload", "replica_costs", "search", "simulate", "simulate_plan",
]
