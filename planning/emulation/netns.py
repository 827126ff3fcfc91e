"""Network namespaces through iproute2: naming, creating, running in, killing the processes of, deleting.

Every object the harness makes is named ``hxc-<pid>-<tag>-<role>`` (namespaces and cgroup directories alike),
where <pid> is the test process that made it.  A name whose <pid> is gone (or is this very process but belongs
to no cluster still open) is a leftover of a crashed run, and :func:`remove_stale` deletes it.  Interface names
never carry the prefix: each lives in a namespace of its own (``eth0`` in a host, ``p<i>`` and ``br0`` in the
switch), so the 15-character limit does not bite and nothing ever appears in the root namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "hxc"
NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-z]+)-(.+)$")
NETNS_DIR = Path("/run/netns")
IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"


class HarnessError(RuntimeError):
    """An iproute2 / tc / cgroup command failed."""


def sh(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run a management command (ip, tc) in the root namespace and return its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list`` prints "name (id: N)")."""
    out = sh([IP, "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add(name: str) -> None:
    sh([IP, "netns", "add", name])
    sh([IP, "-n", name, "link", "set", "lo", "up"])


def pids(name: str) -> list[int]:
    """Every process whose network namespace is ``name`` (children included, whoever started them)."""
    out = sh([IP, "netns", "pids", name], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_all(name: str, *, grace: float = 0.0, timeout: float = 10.0) -> None:
    """Signal every process in the namespace (SIGTERM, then after ``grace`` s SIGKILL) until none is left.

    Forks can race with the listing, so this loops until ``ip netns pids`` comes back empty.
    """
    deadline = time.monotonic() + timeout
    if grace > 0:
        for pid in pids(name):
            _signal(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and pids(name):
            time.sleep(0.02)
    while True:
        alive = pids(name)
        if not alive:
            return
        for pid in alive:
            _signal(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {alive} in namespace {name} survive SIGKILL")
        time.sleep(0.02)


def _signal(pid: int, sig: int) -> None:
    if pid == os.getpid():  # never ourselves (cannot happen unless the test process entered a namespace)
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def delete(name: str) -> None:
    """Kill what runs in the namespace, then delete it (its veth ends and bridge go with it)."""
    if name not in list_netns():
        return
    kill_all(name)
    sh([IP, "netns", "del", name], check=False)
    if name in list_netns():
        raise HarnessError(f"namespace {name} could not be deleted")


def exec_argv(name: str, argv: list[str]) -> list[str]:
    """argv that runs ``argv`` inside namespace ``name`` (``ip netns exec`` also remounts /sys for it)."""
    return [IP, "netns", "exec", name, *[os.fspath(a) for a in argv]]


def owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(name: str, live_tags: set[str]) -> bool:
    """True for a harness-made name whose run is over: its pid is dead, or it is ours but no open cluster owns it."""
    if not name.startswith(PREFIX + "-"):
        return False
    m = NAME_RE.match(name)
    if m is None:
        return True  # our prefix but not our shape: a half-made name from an older harness; remove it
    pid, tag = int(m.group(1)), m.group(2)
    if pid == os.getpid():
        return tag not in live_tags
    return not owner_alive(pid)


def remove_stale(live_tags: set[str]) -> list[str]:
    """Delete leftover harness namespaces of crashed runs; returns their names."""
    removed = []
    for name in list_netns():
        if is_stale(name, live_tags):
            delete(name)
            removed.append(name)
    return removed
