"""The cluster file: which devices exist, where, and how they are connected.

```yaml
gpus:                      # optional: extra device types or overrides of the built-in catalog;
  MyGPU: {memory_gb: 24, tflops: 100, mem_bandwidth_gbs: 900}
  local-cpu: configs/devices/local-cpu.yaml     # or a device spec file (see planning/inputs/catalog.py)
nodes:
  - {name: iceland-0, site: iceland, gpu: RTX3090Ti, count: 8, price_per_hour: 4.2}
links:                     # defaults by class, then per-site-pair overrides
  intra_node: {bandwidth_gbps: 100, latency_ms: 0.01}   # or a device spec file's `link:` by path
  intra_site: {bandwidth_gbps: 10, latency_ms: 0.1}
  inter_site: {bandwidth_gbps: 1, latency_ms: 30}
  overrides:
    - {sites: [iceland, norway], bandwidth_gbps: 5, latency_ms: 10}
```

Bandwidths are Gbit/s, latencies ms. Paths are relative to the cluster file's directory, then to
the working directory. Every node holds `count` devices of one type, addressed `NAME/cuda:0..count-1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hexcore.config import load_yaml_spec
from planning.inputs.catalog import GPU_CATALOG, DeviceSpec, LinkSpec, load_device_file


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    site: str | None = None  # default: the node is its own site
    gpu: str
    count: int = Field(ge=1)
    price_per_hour: float | None = Field(default=None, ge=0)


class LinkOverride(LinkSpec):
    sites: tuple[str, str]


class LinksSpec(_Spec):
    intra_node: LinkSpec | str = LinkSpec(bandwidth_gbps=100, latency_ms=0.01)
    intra_site: LinkSpec | str = LinkSpec(bandwidth_gbps=10, latency_ms=0.1)
    inter_site: LinkSpec | str = LinkSpec(bandwidth_gbps=1, latency_ms=30)
    overrides: list[LinkOverride] = []


class ClusterSpec(_Spec):
    gpus: dict[str, DeviceSpec | str] = {}
    nodes: list[NodeSpec] = Field(min_length=1)
    links: LinksSpec = LinksSpec()

    @field_validator("nodes")
    @classmethod
    def _unique_names(cls, nodes: list[NodeSpec]) -> list[NodeSpec]:
        names = [node.name for node in nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names {duplicates}")
        return nodes


@dataclass(frozen=True)
class Node:
    """A node with its device spec resolved."""

    index: int
    name: str
    site: str
    gpu: str
    device: DeviceSpec
    count: int
    price_per_hour: float | None


@dataclass(frozen=True)
class Cluster:
    """The resolved cluster: nodes with device specs, and the link between any two nodes."""

    nodes: tuple[Node, ...]
    intra_node: LinkSpec
    intra_site: LinkSpec
    inter_site: LinkSpec
    overrides: tuple[LinkOverride, ...] = ()

    @property
    def num_devices(self) -> int:
        return sum(node.count for node in self.nodes)

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(node.site for node in self.nodes))

    @property
    def price_per_hour(self) -> float | None:
        prices = [node.price_per_hour for node in self.nodes]
        return None if None in prices else sum(prices)

    def node_index(self, name: str) -> int:
        for node in self.nodes:
            if node.name == name:
                return node.index
        raise ValueError(f"node {name!r} is not in the cluster (nodes: {[n.name for n in self.nodes]})")

    def link(self, a: int, b: int) -> LinkSpec:
        """The link between a device on node a and one on node b."""
        if a == b:
            return self.intra_node
        return self._site_links[frozenset((self.nodes[a].site, self.nodes[b].site))]

    @cached_property
    def _site_links(self) -> dict[frozenset, LinkSpec]:
        links = {}
        for x in self.sites:
            for y in self.sites:
                links[frozenset((x, y))] = self.intra_site if x == y else self.inter_site
        for override in self.overrides:
            links[frozenset(override.sites)] = LinkSpec.model_validate(override.model_dump(exclude={"sites"}))
        return links


def build_cluster(spec: ClusterSpec, base_dir: str | Path = ".") -> Cluster:
    """Resolve device types (catalog, `gpus:` entries, device spec files) and link classes."""
    catalog = dict(GPU_CATALOG)
    for name, entry in spec.gpus.items():
        catalog[name] = load_device_file(_find(entry, base_dir)).device() if isinstance(entry, str) else entry
    nodes = []
    for i, node in enumerate(spec.nodes):
        if node.gpu not in catalog:
            raise ValueError(f"node {node.name!r}: unknown gpu {node.gpu!r}; known: {sorted(catalog)}")
        nodes.append(Node(i, node.name, node.site or node.name, node.gpu, catalog[node.gpu], node.count, node.price_per_hour))
    links = {}
    for cls_name in ("intra_node", "intra_site", "inter_site"):
        entry = getattr(spec.links, cls_name)
        if isinstance(entry, str):
            device_file = load_device_file(_find(entry, base_dir))
            if device_file.link is None:
                raise ValueError(f"links.{cls_name}: device spec file {entry!r} has no `link:` section")
            entry = device_file.link
        links[cls_name] = entry
    sites = {node.site for node in nodes}
    for override in spec.links.overrides:
        if not set(override.sites) <= sites:
            raise ValueError(f"link override names unknown sites {list(override.sites)}; sites: {sorted(sites)}")
    return Cluster(tuple(nodes), overrides=tuple(spec.links.overrides), **links)


def load_cluster(path: str | Path) -> Cluster:
    """Read, validate and resolve a cluster YAML file."""
    spec = load_yaml_spec(path, ClusterSpec, "cluster file")
    return build_cluster(spec, Path(path).parent)


def _find(relative: str, base_dir: str | Path) -> Path:
    candidate = Path(base_dir) / relative
    return candidate if candidate.is_file() else Path(relative)
