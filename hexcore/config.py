"""The deployment file: the contract shared by `hexgen serve`, `hexgen plan`, the engine and users.

```yaml
model: default            # or a path to an HF-format directory
served_model_name: null   # name reported by /v1/models (default: derived from the model)
dtype: float32            # float32 | bfloat16 | float16
max_model_len: null       # default: the model's max_position_embeddings
replicas:
  - name: r0
    stages:
      - {devices: [cpu, cpu], layers: 20}   # TP degree = number of devices
      - {devices: [cpu], layers: 10}
server: {host: 127.0.0.1, port: 8000}
engine: {...}             # optional tuning knobs, see EngineSpec
```

Everything here is a frozen pydantic model; unknown keys are errors. The checks that need the model
(layer sums, head divisibility) live in `check_against_model`, run once the model config is known.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SpecT = TypeVar("SpecT", bound=BaseModel)
_DEVICE_RE = re.compile(r"^(?:(?P<node>[A-Za-z0-9_.\-]+)/)?(?P<kind>cpu|cuda)(?::(?P<index>\d+))?$")


class Device(BaseModel):
    """A parsed device name: `cpu`, `cuda:N`, optionally prefixed by a node (`nodeA/cuda:3`)."""

    model_config = ConfigDict(frozen=True)

    node: str | None
    kind: Literal["cpu", "cuda"]
    index: int | None

    @classmethod
    def parse(cls, name: str) -> "Device":
        match = _DEVICE_RE.match(name.strip())
        if match is None:
            raise ValueError(
                f"unknown device {name!r}: expected 'cpu', 'cuda:N' or 'NODE/cuda:N'"
            )
        index = match["index"]
        if match["kind"] == "cuda" and index is None:
            index = "0"
        if match["kind"] == "cpu" and index is not None:
            raise ValueError(f"unknown device {name!r}: cpu takes no index")
        return cls(node=match["node"], kind=match["kind"], index=int(index) if index else None)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_name(self) -> str:
        """The name torch understands on the node that runs it."""
        return f"cuda:{self.index}" if self.is_cuda else "cpu"

    def __str__(self) -> str:
        prefix = f"{self.node}/" if self.node else ""
        return prefix + self.torch_name


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageSpec(_Spec):
    devices: list[str] = Field(min_length=1)
    layers: int = Field(ge=1)

    @field_validator("devices")
    @classmethod
    def _devices_parse(cls, devices: list[str]) -> list[str]:
        for name in devices:
            Device.parse(name)
        return devices

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def parsed_devices(self) -> list[Device]:
        return [Device.parse(name) for name in self.devices]


class ReplicaSpec(_Spec):
    name: str | None = None
    stages: list[StageSpec] = Field(min_length=1)
    # written by `hexgen plan`; the router weighs replicas by it (else by measured throughput)
    predicted_throughput_rps: float | None = Field(default=None, gt=0)

    @property
    def num_workers(self) -> int:
        return sum(stage.tp for stage in self.stages)

    @property
    def num_layers(self) -> int:
        return sum(stage.layers for stage in self.stages)


class ServerSpec(_Spec):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    max_waiting_requests: int = Field(default=256, ge=1)
    max_n: int = Field(default=128, ge=1)  # the most choices (`n`) one request may ask for; more is a 400
    drain_seconds: float = Field(default=30.0, gt=0)  # on SIGTERM/SIGINT: how long in-flight requests may finish


class ClusterSpec(_Spec):
    """How the hosts of a multi-host deployment join (ignored when every device is on the head), and what
    the head's own host gives its workers."""

    node_name: str = "head"  # devices on this node (or with no node) run on the head
    host: str = "127.0.0.1"  # where the cluster port listens: an address the other hosts reach
    port: int = Field(default=8478, ge=1, le=65535)
    token_file: str | None = None  # else $HEXGEN_CLUSTER_TOKEN
    join_timeout_seconds: float = Field(default=120.0, gt=0)
    # what the head's own host gives its workers (a node's agent says it with `hexgen node --num-cpus
    # --memory-gb`); default: all its cores and RAM
    num_cpus: int | None = Field(default=None, ge=1)
    memory_gb: float | None = Field(default=None, gt=0)


class EngineSpec(_Spec):
    """Engine knobs (an extension of the deployment file; every field has a sane default)."""

    block_size: int = Field(default=16, ge=1)
    num_kv_blocks: int | None = Field(default=None, ge=1)  # per replica; default from the memory budget
    kv_cache_memory_fraction: float = Field(default=0.2, gt=0, le=0.9)  # of the host's memory budget on CPU / free memory on GPU
    max_num_seqs: int = Field(default=64, ge=1)  # running sequences per replica
    max_num_batched_tokens: int = Field(default=512, ge=1)  # token budget of one step
    num_micro_batches: int | None = Field(default=None, ge=1)  # default: the replica's number of stages
    num_threads_per_worker: int | None = Field(default=None, ge=1)  # default: its host's cores / its workers there
    enable_prefix_caching: bool = True
    # a step still in flight this long (plus 4x its expected time) means a stalled worker: its replica
    # is failed over and restarted, as if a worker had died
    stall_timeout_seconds: float = Field(default=15.0, gt=0)
    # a replica not back after this many restarts (backoff 0.5 s, doubling up to 30 s): the engine stops
    max_restart_attempts: int = Field(default=5, ge=1)


class DeploymentConfig(_Spec):
    model: str = "default"
    served_model_name: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int | None = Field(default=None, ge=1)
    replicas: list[ReplicaSpec] = Field(
        default_factory=lambda: [ReplicaSpec(name="r0", stages=[StageSpec(devices=["cpu"], layers=1)])],
        min_length=1,
    )
    server: ServerSpec = ServerSpec()
    engine: EngineSpec = EngineSpec()
    cluster: ClusterSpec = ClusterSpec()

    @property
    def replica_names(self) -> list[str]:
        return [replica.name or f"r{i}" for i, replica in enumerate(self.replicas)]

    def node_of(self, device: Device) -> str | None:
        """The node a device runs on, None for the head."""
        return None if device.node in (None, self.cluster.node_name) else device.node

    @property
    def remote_nodes(self) -> list[str]:
        """The nodes other than the head that the deployment places devices on, in order."""
        nodes = [self.node_of(d) for r in self.replicas for s in r.stages for d in s.parsed_devices]
        return list(dict.fromkeys(n for n in nodes if n is not None))


def load_config(path: str | Path) -> DeploymentConfig:
    """Read and validate a deployment YAML file (the schema only; see `check_against_model`)."""
    return load_yaml_spec(path, DeploymentConfig, "deployment file")


def parse_config(raw: dict, source: str = "deployment config") -> DeploymentConfig:
    return validate_spec(raw, DeploymentConfig, source)


def load_yaml_spec(path: str | Path, spec_class: type[SpecT], what: str) -> SpecT:
    """Read a YAML file holding one mapping and validate it as `spec_class`. Every problem is a
    ValueError naming the file and the offending keys."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a mapping at top level")
    return validate_spec(raw, spec_class, f"{what} {str(path)!r}")


def validate_spec(raw: dict, spec_class: type[SpecT], source: str) -> SpecT:
    try:
        return spec_class.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"invalid {source}: {problems}") from None


def single_device_config(model: str = "default", num_layers: int = 1, **fields) -> DeploymentConfig:
    """The default deployment: one replica, one stage, one cpu device holding every layer."""
    stage = StageSpec(devices=["cpu"], layers=num_layers)
    return DeploymentConfig(model=model, replicas=[ReplicaSpec(name="r0", stages=[stage])], **fields)


def check_against_model(
    config: DeploymentConfig, num_layers: int, num_heads: int, num_kv_heads: int
) -> None:
    """Raise ValueError naming the replica, stage and numbers when the layout cannot hold the model."""
    for replica_name, replica in zip(config.replica_names, config.replicas):
        if replica.num_layers != num_layers:
            per_stage = " + ".join(str(stage.layers) for stage in replica.stages)
            raise ValueError(
                f"replica {replica_name!r}: stage layers sum to {replica.num_layers} "
                f"({per_stage}) but the model has {num_layers} layers"
            )
        for j, stage in enumerate(replica.stages):
            for what, count in (("attention heads", num_heads), ("KV heads", num_kv_heads)):
                if count % stage.tp:
                    raise ValueError(
                        f"replica {replica_name!r}, stage {j}: TP degree {stage.tp} does not divide "
                        f"the model's {count} {what}"
                    )
