"""Device and link specifications, and the built-in GPU catalog.

A device spec holds what the cost model needs to know about one accelerator: its memory, its memory
bandwidth and its dense matmul throughput, plus optional fixed overheads that calibration fits on
machines where framework overhead matters (CPUs, small models). A link spec holds the alpha-beta
parameters of a connection between two devices.

`hexgen calibrate` writes a device spec file (e.g. `configs/devices/local-cpu.yaml`):

```yaml
memory_gb: 16              # the memory budget of one worker
tflops: 0.4                # measured dense matmul throughput, dtype in use
mem_bandwidth_gbs: 12      # measured streaming bandwidth
kind: cpu                  # device names in plans become `cpu` instead of `cuda:i`
overhead_ms_per_layer: 0.05
overhead_ms_per_step: 1.0
overhead_us_per_kv_token: 0.5  # per cached token attention reads, per layer (paged-KV gather)
gemm_weight_passes: 1.0     # optional, set by hand: weight streams of a multi-token step (default 1)
source: "hexgen calibrate, 2026-11-24, 2 cores"
link: {bandwidth_gbps: 20, latency_ms: 0.05, allreduce_latency_ms: 0.1,   # optional, between workers
       allreduce_latency_ms_by_tp: {2: 0.1, 3: 0.4}}                     # optional, per group size
```

A cluster file uses it by path: `gpus: {local-cpu: configs/devices/local-cpu.yaml}`, and its `link`
section with `links: {intra_node: configs/devices/local-cpu.yaml}` (see planning/inputs/cluster.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hexcore.config import load_yaml_spec

GB = 1e9


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceSpec(_Spec):
    """One device as the cost model sees it."""

    memory_gb: float = Field(gt=0)
    tflops: float = Field(gt=0)  # dense fp16/bf16 tensor throughput (or measured, for calibrated specs)
    mem_bandwidth_gbs: float = Field(gt=0)  # GB/s
    kind: Literal["cuda", "cpu"] = "cuda"
    overhead_ms_per_layer: float = Field(default=0.0, ge=0)  # fixed cost per layer per step
    overhead_ms_per_step: float = Field(default=0.0, ge=0)  # fixed cost per stage per step
    overhead_us_per_kv_token: float = Field(default=0.0, ge=0)  # per cached token read, per layer
    # times a step of more than one token streams the weights: for kernels that re-read them (set by hand;
    # calibration fits hexcore's CPU loop, which streams them once)
    gemm_weight_passes: float = Field(default=1.0, ge=1)
    source: str | None = None

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GB

    @property
    def flops(self) -> float:
        return self.tflops * 1e12

    @property
    def bandwidth_bytes(self) -> float:
        return self.mem_bandwidth_gbs * GB


class LinkSpec(_Spec):
    """A connection: bandwidth in Gbit/s (network convention), latency per message in ms.

    `allreduce_latency_ms`, when measured, replaces the ring's 2*(t-1)*latency term of an all-reduce
    (collective libraries pay less than one point-to-point latency per ring step);
    `allreduce_latency_ms_by_tp` does so per group size where measured (`hexgen calibrate` measures
    2 and 3 workers: on a small CPU, 3 workers share 2 cores and wait much longer).
    """

    bandwidth_gbps: float = Field(gt=0)
    latency_ms: float = Field(ge=0)
    allreduce_latency_ms: float | None = Field(default=None, ge=0)
    allreduce_latency_ms_by_tp: dict[int, float] | None = None

    def allreduce_latency_s(self, tp: int) -> float | None:
        """The measured all-reduce latency of a group of `tp` devices, if any (else None)."""
        if self.allreduce_latency_ms_by_tp and tp in self.allreduce_latency_ms_by_tp:
            return self.allreduce_latency_ms_by_tp[tp] / 1e3
        return self.allreduce_latency_ms / 1e3 if self.allreduce_latency_ms is not None else None

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_gbps * GB / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3


def _gpu(memory_gb: float, mem_bandwidth_gbs: float, tflops: float, source: str) -> DeviceSpec:
    return DeviceSpec(memory_gb=memory_gb, mem_bandwidth_gbs=mem_bandwidth_gbs, tflops=tflops, source=source)


# Vendor peak figures: memory (GB), memory bandwidth (GB/s), dense (no sparsity) fp16 tensor TFLOPS.
# GeForce cards are listed with fp32 accumulation (what fp16 GEMMs in inference frameworks use),
# which NVIDIA's GeForce whitepapers rate at half the fp16-accumulate figure.
GPU_CATALOG: dict[str, DeviceSpec] = {
    "A100-40G": _gpu(40, 1555, 312, "NVIDIA A100 datasheet (SXM4 40GB): 1555 GB/s, 312 TFLOPS fp16 tensor dense"),
    "A100-80G": _gpu(80, 2039, 312, "NVIDIA A100 datasheet (SXM4 80GB): 2039 GB/s, 312 TFLOPS fp16 tensor dense"),
    "H100": _gpu(80, 3350, 989, "NVIDIA H100 datasheet (SXM5): 3.35 TB/s, 989 TFLOPS fp16 tensor dense"),
    "L40S": _gpu(48, 864, 362, "NVIDIA L40S datasheet: 864 GB/s, 362 TFLOPS fp16 tensor dense (733 sparse)"),
    "A40": _gpu(48, 696, 149.7, "NVIDIA A40 datasheet: 696 GB/s, 149.7 TFLOPS fp16 tensor dense (299.4 sparse)"),
    "A6000": _gpu(48, 768, 154.8, "NVIDIA RTX A6000 datasheet: 768 GB/s, 154.8 TFLOPS tensor dense (309.7 sparse)"),
    "A5000": _gpu(24, 768, 111.1, "NVIDIA RTX A5000 datasheet: 768 GB/s, 111.1 TFLOPS tensor dense (222.2 sparse)"),
    "A4000": _gpu(16, 448, 76.7, "NVIDIA RTX A4000 datasheet: 448 GB/s, 76.7 TFLOPS tensor dense (153.4 sparse)"),
    "RTX3090Ti": _gpu(24, 1008, 80, "NVIDIA Ampere GA102 whitepaper, RTX 3090 Ti: 1008 GB/s, 80 TFLOPS fp16 tensor fp32-acc dense (160 fp16-acc)"),
    "RTX4090": _gpu(24, 1008, 165.2, "NVIDIA Ada whitepaper, RTX 4090: 1008 GB/s, 165.2 TFLOPS fp16 tensor fp32-acc dense (330.3 fp16-acc)"),
    "V100": _gpu(32, 900, 125, "NVIDIA V100 datasheet (SXM2 32GB): 900 GB/s, 125 TFLOPS tensor"),
    "T4": _gpu(16, 320, 65, "NVIDIA T4 datasheet: 320 GB/s, 65 TFLOPS fp16 tensor"),
}


class DeviceFile(DeviceSpec):
    """The file `hexgen calibrate` writes: a device spec, optionally with the measured worker link."""

    name: str | None = None
    link: LinkSpec | None = None

    def device(self) -> DeviceSpec:
        return DeviceSpec.model_validate(self.model_dump(exclude={"name", "link"}))


def load_device_file(path: str | Path) -> DeviceFile:
    """Read a device spec file (as written by `hexgen calibrate`)."""
    return load_yaml_spec(path, DeviceFile, "device spec file")
