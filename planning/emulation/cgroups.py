"""cgroup v1 CPU quotas: one directory per emulated host under /sys/fs/cgroup/cpu, named like its namespace.

A process joins its host's group *before* it execs the real program (``sh -c 'echo $$ > cgroup.procs; exec ...'``),
so none of its work, nor that of anything it forks, escapes the quota.  The join happens before
``ip netns exec``, because that command remounts /sys in a private mount namespace, where /sys/fs/cgroup is empty.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .netns import HarnessError, is_stale

CPU_ROOT = Path("/sys/fs/cgroup/cpu")


def unavailable_reason() -> str | None:
    """Why a CPU quota cannot be set here, or None."""
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"cgroup v1 cpu controller not mounted at {CPU_ROOT} (no cpu.cfs_quota_us)"
    probe = CPU_ROOT / f"hxc-{os.getpid()}-probe-cpu"
    try:
        probe.mkdir(exist_ok=True)
        (probe / "cpu.cfs_quota_us").write_text("50000")
    except OSError as exc:
        return f"cannot make a cgroup with a CPU quota under {CPU_ROOT}: {exc}"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass
    return None


def path(name: str) -> Path:
    return CPU_ROOT / name


def create(name: str) -> Path:
    group = path(name)
    group.mkdir(exist_ok=True)
    return group


def set_quota(name: str, cores: float | None, period_us: int | None = None) -> None:
    """Limit the group to ``cores`` of a CPU (0.25 = a quarter of one core per period); None = no limit.

    ``period_us``: the CFS period (default: the group's, 100 ms). A shorter one spreads a small quota into
    shorter bursts: 0.2 core over 10 ms runs 2 ms of every 10, not 20 ms of every 100.
    """
    group = path(name)
    if period_us is not None:
        if not 1000 <= period_us <= 1_000_000:
            raise ValueError(f"cpu period must be 1000..1000000 us, got {period_us}")
        (group / "cpu.cfs_quota_us").write_text("-1")  # a quota longer than the new period would be refused
        (group / "cpu.cfs_period_us").write_text(str(int(period_us)))
    if cores is None:
        (group / "cpu.cfs_quota_us").write_text("-1")
        return
    if cores <= 0:
        raise ValueError(f"cpu quota must be > 0 cores, got {cores}")
    period = int((group / "cpu.cfs_period_us").read_text())
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(round(cores * period)))))


def set_shares(name: str, shares: int) -> None:
    """The group's CFS weight against its siblings (a plain process at the top level weighs 1024)."""
    (path(name) / "cpu.shares").write_text(str(int(shares)))


def quota(name: str) -> float | None:
    group = path(name)
    q = int((group / "cpu.cfs_quota_us").read_text())
    return None if q < 0 else q / int((group / "cpu.cfs_period_us").read_text())


def stat(name: str) -> dict[str, int]:
    """cpu.stat of the group: nr_periods, nr_throttled, throttled_time (ns)."""
    out = {}
    for line in (path(name) / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def procs(name: str) -> list[int]:
    try:
        return [int(p) for p in (path(name) / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def join_argv(name: str, argv: list[str]) -> list[str]:
    """argv that puts itself into the group, then execs ``argv`` (which inherits the group)."""
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(path(name) / "cgroup.procs"), *argv]


def remove(name: str, *, timeout: float = 10.0) -> None:
    """Kill whatever is still in the group, then remove it (a group with members cannot be removed)."""
    group = path(name)
    if not group.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        members = [p for p in procs(name) if p != os.getpid()]
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if os.getpid() in procs(name):  # never kill ourselves: move out instead
            (CPU_ROOT / "cgroup.procs").write_text(str(os.getpid()))
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise HarnessError(f"cgroup {group} cannot be removed: {exc}; members {procs(name)}") from exc
            time.sleep(0.02)


def list_groups() -> list[str]:
    if not CPU_ROOT.is_dir():
        return []
    return sorted(p.name for p in CPU_ROOT.iterdir() if p.is_dir() and p.name.startswith("hxc-"))


def remove_stale(live_tags: set[str]) -> list[str]:
    removed = []
    for name in list_groups():
        if name.startswith(f"hxc-{os.getpid()}-probe-"):
            continue
        if is_stale(name, live_tags):
            remove(name)
            removed.append(name)
    return removed
