"""Where the workers of a replica meet to form their torch.distributed world: a c10d TCPStore hosted
by the driver, listening only on the address it is given (loopback for a one-host deployment). Each
start of a replica gets a key prefix of its own, so a restarted replica never reads an earlier
start's keys."""

from __future__ import annotations

import itertools
import socket
from datetime import timedelta

import torch.distributed as dist


class Rendezvous:
    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))  # bound here: torch would listen on every interface
        listener.listen(1024)
        port = listener.getsockname()[1]
        self._store = dist.TCPStore(host, port, is_master=True, master_listen_fd=listener.detach(),  # the store owns it
                                    wait_for_workers=False, timeout=timedelta(minutes=5))
        self.address = f"{host}:{port}"
        self._starts = itertools.count()

    def new_prefix(self, replica: str) -> str:
        """The key prefix of one start of `replica`'s world."""
        return f"{replica}/{next(self._starts)}/"

    def close(self) -> None:
        self._store = None  # the store's server stops and closes its socket


def join_store(address: str, prefix: str, timeout: timedelta) -> dist.Store:
    """A worker's view of its replica's store (a client of the driver's TCPStore)."""
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timeout)
    return dist.PrefixStore(prefix, store)
