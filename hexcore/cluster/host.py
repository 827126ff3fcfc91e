"""What a host is, as the head needs to know it: its devices, memory, cores, addresses and the
versions it runs; and which of its interfaces reaches a given address (for gloo's sockets)."""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from hexcore.config import Device
from hexcore.hardware import HostBudget


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    addresses: tuple[str, ...]
    devices: tuple[str, ...]  # "cpu", "cuda:0", ...
    memory_bytes: int  # its budget for hexgen's workers (HostBudget): all its RAM unless told less
    num_cores: int  # likewise its cores
    hexgen_version: str
    torch_version: str

    def has(self, device: Device) -> bool:
        return device.torch_name in self.devices


def hexgen_version() -> str:
    try:
        return version("hexgen")
    except PackageNotFoundError:
        return "unknown"


    @property
    def budget(self) -> HostBudget:
        return HostBudget(self.num_cores, self.memory_bytes)


def this_host(budget: HostBudget) -> HostInfo:
    devices = ("cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    addresses = tuple(sorted({address for _, address in _interface_addresses()}))
    return HostInfo(socket.gethostname(), addresses, devices, budget.memory_bytes, budget.num_cpus,
                    hexgen_version(), torch.__version__)


def local_address_toward(host: str) -> str:
    """The address this host sends from to reach `host` (the kernel's route choice; nothing is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


def interface_toward(host: str) -> str:
    """The name of the interface holding the address this host reaches `host` from ("lo" for loopback)."""
    address = local_address_toward(host)
    for name, held in _interface_addresses():
        if held == address:
            return name
    raise ValueError(f"no interface holds {address}, the address toward {host}")


def _interface_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) for every interface that has one."""
    pairs = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), 0x8915, request)  # SIOCGIFADDR
                pairs.append((name, socket.inet_ntoa(reply[20:24])))
            except OSError:
                continue  # no IPv4 address
    return pairs
