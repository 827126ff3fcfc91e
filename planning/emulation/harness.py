"""An emulated multi-host cluster on one Linux machine, for tests and experiments (root only; see :func:`skip_reason`).

Each host is a network namespace with one interface, ``eth0``, holding an address of a /24 that exists only inside
the cluster's namespaces.  All hosts plug into a bridge that lives in a "switch" namespace of its own, so nothing
(no interface, address, route or bridge) is ever made in the root namespace.  Links are shaped per ordered pair of
hosts with htb + u32 on the sender's ``eth0`` (see shaping.py); a host's traffic to itself goes over its ``lo`` and
is unshaped.  A host can get a CPU quota: its processes then run in a cgroup v1 cpu group of its own (cgroups.py).

    with EmulatedCluster(["head", "a", "b"], sites={"head": "s1", "a": "s1", "b": "s2"},
                         bandwidth_mbit={("s1", "s1"): 1000, ("s1", "s2"): 50}) as cluster:
        cluster.address("a")                                   # "10.213.X.3"
        proc = cluster.popen("a", [sys.executable, "-c", "..."], cpu_quota=0.4)
        cluster.run("b", ["ip", "addr"]).stdout
        cluster.set_bandwidth("a", "b", mbit=20)               # both directions
        cluster.kill_host("a")                                 # SIGKILL everything in a's namespace

Clean-up (kill every process in every namespace of the cluster, delete the namespaces -- which deletes the veths
and the bridge -- and remove the cgroups) runs from ``__exit__`` / :meth:`close`, from an atexit hook, and from
SIGTERM / SIGINT handlers that then hand the signal on to whatever handled it before.  Leftovers of a run that
died without any of those (SIGKILL, power loss) are removed when the next cluster starts: names carry the pid of
the process that made them, and one whose process is gone is stale.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from . import cgroups, netns, shaping
from .netns import HarnessError

__all__ = ["EmulatedCluster", "HarnessError", "skip_reason", "live_clusters"]

_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,31}$")
_SUBNET_BASE = "10.213"
CPU_SHARES = 8 * 1024  # cpu.shares of a host's group (a plain process weighs 1024)

_LOCK = threading.RLock()
_LIVE: dict[str, "EmulatedCluster"] = {}
_PREVIOUS_HANDLERS: dict[int, object] = {}
_ATEXIT_REGISTERED = False


# ----------------------------------------------------------------------------------------------- availability

_SKIP_CACHE: dict[bool, str | None] = {}


def skip_reason(cpu_quota: bool = False) -> str | None:
    """Why an emulated cluster cannot be built here (a sentence for pytest.skip), or None if it can.

    Checks: Linux, root, iproute2 and tc present, ``ip netns add`` / ``ip netns exec`` work, a veth pair and an
    htb qdisc with a u32 filter can be made in a namespace; with ``cpu_quota``, also that cgroup v1's cpu
    controller is mounted and a group with a quota can be made.
    """
    if cpu_quota not in _SKIP_CACHE:
        reason = _network_reason()
        if reason is None and cpu_quota:
            reason = cgroups.unavailable_reason()
        _SKIP_CACHE[cpu_quota] = reason
    return _SKIP_CACHE[cpu_quota]


def _network_reason() -> str | None:
    if not os.uname().sysname == "Linux":
        return "emulated cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "emulated cluster needs root (network namespaces, tc, cgroups); run the tests as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and not os.path.exists(getattr(netns, tool.upper())):
            return f"emulated cluster needs iproute2's `{tool}`, not found"
    probe = f"{netns.PREFIX}-{os.getpid()}-probe-net"
    try:
        try:
            netns.add(probe)
        except HarnessError as exc:
            return f"cannot create a network namespace (`ip netns add`): {exc}"
        try:
            netns.sh(netns.exec_argv(probe, ["true"]))
        except HarnessError as exc:
            return f"cannot run in a network namespace (`ip netns exec`): {exc}"
        try:
            netns.sh([netns.IP, "-n", probe, "link", "add", "eth0", "type", "veth", "peer", "name", "p0"])
        except HarnessError as exc:
            return f"cannot create a veth pair in a namespace: {exc}"
        try:
            shaping.init(probe)
            shaping.set_rate(probe, 0, "10.0.0.1", 10.0, existed=False)
        except HarnessError as exc:
            return f"tc htb with u32 filters is not available: {exc}"
        return None
    finally:
        try:
            netns.delete(probe)
        except HarnessError:
            pass


# ------------------------------------------------------------------------------------------- the cluster

class EmulatedCluster:
    """Hosts as network namespaces on one bridge, links shaped per pair, optional CPU quota per host.

    hosts           names of the hosts (letters, digits, ``_`` and ``.``; at most 32 characters)
    sites           host -> site; bandwidth is looked up by the pair of sites.  Default: each host is its own
                    site, so ``bandwidth_mbit`` may be keyed by pairs of hosts.
    bandwidth_mbit  {(site, site): Mbit/s}, unordered pairs, (s, s) for hosts of one site.  A pair not listed gets
                    ``default_mbit``; None means unshaped (as fast as the veth goes).
    cpu_quota       {host: cores}, e.g. {"a": 0.4}: the host's processes share 0.4 of one CPU (cgroup v1 CFS quota)
    cpu_period_us   the CFS period of every host's quota (default: the kernel's, 100 ms)
    """

    interface = shaping.DEV

    def __init__(self, hosts: Sequence[str], *, sites: Mapping[str, str] | None = None,
                 bandwidth_mbit: Mapping[tuple[str, str], float] | None = None, default_mbit: float | None = None,
                 cpu_quota: Mapping[str, float] | None = None, cpu_period_us: int | None = None):
        hosts = list(hosts)
        if not hosts:
            raise ValueError("a cluster needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"duplicate host names in {hosts}")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts (one /24)")
        for host in hosts:
            if not _HOST_RE.match(host):
                raise ValueError(f"bad host name {host!r}: letters, digits, '_' and '.', at most 32 characters")
        self.hosts = hosts
        self.sites = {h: h for h in hosts} if sites is None else dict(sites)
        missing = [h for h in hosts if h not in self.sites]
        if missing:
            raise ValueError(f"hosts without a site: {missing}")
        self._site_bw: dict[frozenset, float | None] = {}
        for (s1, s2), mbit in (bandwidth_mbit or {}).items():
            self._site_bw[frozenset((s1, s2))] = mbit
        self.default_mbit = default_mbit
        self._initial_quota = dict(cpu_quota or {})
        self.cpu_period_us = cpu_period_us
        unknown = [h for h in self._initial_quota if h not in hosts]
        if unknown:
            raise ValueError(f"cpu_quota for unknown hosts {unknown}")

        self.tag = "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))
        self.prefix = f"{netns.PREFIX}-{os.getpid()}-{self.tag}"
        self.subnet_octet = random.randrange(1, 255)
        self.subnet = f"{_SUBNET_BASE}.{self.subnet_octet}.0/24"
        self._index = {h: i for i, h in enumerate(hosts)}
        self._bw: dict[tuple[str, str], float | None] = {}   # ordered (src, dst) -> Mbit/s as shaped now
        self._cgroups: dict[str, str] = {}                   # host -> cgroup name, for hosts with a quota
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._made: list[str] = []                           # namespaces created, in order
        self._started = False
        self._closed = False

    # ---- names and addresses

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}--switch"  # a host name cannot start with '-', so this never clashes

    def netns(self, host: str) -> str:
        """Name of the host's network namespace (for ``ip netns exec NAME ...`` / ``ip -n NAME ...``)."""
        self._check_host(host)
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        """The host's IPv4 address; it exists only on the host's eth0, inside the cluster's namespaces."""
        self._check_host(host)
        return f"{_SUBNET_BASE}.{self.subnet_octet}.{2 + self._index[host]}"

    def addresses(self) -> dict[str, str]:
        return {h: self.address(h) for h in self.hosts}

    def cgroup(self, host: str) -> str | None:
        """Name of the host's cpu cgroup (under /sys/fs/cgroup/cpu), or None while it has no quota."""
        self._check_host(host)
        return self._cgroups.get(host)

    def all_netns(self) -> list[str]:
        return [self.netns(h) for h in self.hosts] + [self.switch_netns]

    def _check_host(self, host: str) -> None:
        if host not in self._index:
            raise KeyError(f"unknown host {host!r}; hosts are {self.hosts}")

    # ---- life cycle

    def __enter__(self) -> "EmulatedCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> "EmulatedCluster":
        if self._started:
            return self
        reason = skip_reason()
        if reason is not None:
            raise HarnessError(f"emulated cluster unavailable: {reason}")
        if self._initial_quota and (reason := skip_reason(cpu_quota=True)) is not None:
            raise HarnessError(f"CPU quotas unavailable: {reason}")
        self._started = True
        _register(self)
        try:
            remove_leftovers()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch_netns
        self._made.append(sw)  # recorded first: a half-made namespace is deleted too
        netns.add(sw)
        netns.sh([netns.IP, "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0"])
        netns.sh([netns.IP, "-n", sw, "link", "set", "br0", "up"])
        for host in self.hosts:
            ns, port = self.netns(host), f"p{self._index[host]}"
            self._made.append(ns)
            netns.add(ns)
            # made inside the switch namespace, one end moved straight into the host's: never in the root namespace
            netns.sh([netns.IP, "-n", sw, "link", "add", port, "type", "veth", "peer", "name", self.interface,
                      "netns", ns])
            netns.sh([netns.IP, "-n", sw, "link", "set", port, "master", "br0", "up"])
            netns.sh([netns.IP, "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", self.interface])
            netns.sh([netns.IP, "-n", ns, "link", "set", self.interface, "up"])
            shaping.init(ns)
        for src in self.hosts:
            for dst in self.hosts:
                if src != dst:
                    self._shape(src, dst, self._configured_bandwidth(src, dst))
        for host, cores in self._initial_quota.items():
            self.set_cpu_quota(host, cores)

    def close(self, *, grace: float = 0.0) -> None:
        """Kill every process in the cluster's namespaces, delete the namespaces and cgroups.  Idempotent.

        ``grace``: seconds between SIGTERM and SIGKILL (0: SIGKILL at once).
        """
        if self._closed:
            return
        self._closed = True
        errors = []
        for ns in [self.netns(h) for h in self.hosts]:
            try:
                if ns in self._made:
                    netns.kill_all(ns, grace=grace)
            except Exception as exc:  # noqa: BLE001 - keep cleaning, report at the end
                errors.append(exc)
        self._reap()
        for ns in reversed(self._made):
            try:
                netns.delete(ns)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        for name in list(self._cgroups.values()):
            try:
                cgroups.remove(name)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        self._reap()
        _unregister(self)
        if errors:
            raise HarnessError(f"clean-up of {self.prefix} incomplete: {errors}")

    def _reap(self, host: str | None = None, timeout: float = 5.0) -> None:
        for h, proc in self._procs:
            if host is None or h == host:
                if proc.poll() is None:
                    try:
                        proc.kill()
                        proc.wait(timeout=timeout)
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        pass

    # ---- bandwidth

    def _configured_bandwidth(self, a: str, b: str) -> float | None:
        return self._site_bw.get(frozenset((self.sites[a], self.sites[b])), self.default_mbit)

    def bandwidth(self, src: str, dst: str) -> float | None:
        """Mbit/s the link src -> dst is shaped to now (None: unshaped)."""
        self._check_host(src)
        self._check_host(dst)
        return None if src == dst else self._bw.get((src, dst))

    def _shape(self, src: str, dst: str, mbit: float | None) -> None:
        existed = self._bw.get((src, dst)) is not None
        shaping.set_rate(self.netns(src), self._index[dst], self.address(dst), mbit, existed=existed)
        self._bw[(src, dst)] = mbit

    def set_bandwidth(self, a: str, b: str, mbit: float | None) -> None:
        """Shape the link between hosts a and b to ``mbit`` Mbit/s in both directions (None: unshape it)."""
        self._check_host(a)
        self._check_host(b)
        if a == b:
            raise ValueError("a host's traffic to itself goes over lo and is not shaped")
        self._shape(a, b, mbit)
        self._shape(b, a, mbit)

    def tc_show(self, host: str) -> str:
        """tc's qdisc / classes (with byte counters) / filters on the host's eth0, for debugging."""
        return shaping.show(self.netns(host))

    # ---- CPU

    def set_cpu_quota(self, host: str, cores: float | None, *, shares: int = CPU_SHARES) -> None:
        """Limit all of the host's processes together to ``cores`` CPUs (None: no limit, but still a group).

        Processes started on the host from then on run in its cgroup; ones already running there are limited at
        once.  ``shares`` is the group's CFS weight: by default 8 plain processes' worth, so that on a machine
        busy with other work the host still gets its quota (the quota, not the neighbours, is what limits it).
        Needs cgroup v1's cpu controller (``skip_reason(cpu_quota=True)``).
        """
        self._check_host(host)
        if host not in self._cgroups:
            reason = skip_reason(cpu_quota=True)
            if reason is not None:
                raise HarnessError(f"CPU quotas unavailable: {reason}")
            name = f"{self.prefix}-{host}"
            cgroups.create(name)
            self._cgroups[host] = name
        cgroups.set_quota(self._cgroups[host], cores, self.cpu_period_us)
        cgroups.set_shares(self._cgroups[host], shares)

    def cpu_quota(self, host: str) -> float | None:
        name = self.cgroup(host)
        return None if name is None else cgroups.quota(name)

    def cpu_stat(self, host: str) -> dict[str, int]:
        """cpu.stat of the host's cgroup (nr_periods, nr_throttled, throttled_time in ns); {} without a quota."""
        name = self.cgroup(host)
        return {} if name is None else cgroups.stat(name)

    # ---- processes

    def exec_argv(self, host: str, argv: Sequence[str], *, cpu_quota: float | None = None) -> list[str]:
        """The argv that runs ``argv`` on ``host`` (in its namespace and, if it has a quota, its cgroup).

        For spawning by other means than :meth:`popen`; such processes are still killed at clean-up (they are in
        the namespace), but not reaped.
        """
        self._require_running()
        if cpu_quota is not None:
            self.set_cpu_quota(host, cpu_quota)
        full = netns.exec_argv(self.netns(host), [os.fspath(a) for a in argv])
        if host in self._cgroups:
            full = cgroups.join_argv(self._cgroups[host], full)
        return full

    def popen(self, host: str, argv: Sequence[str], *, cpu_quota: float | None = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host``; returns the Popen (its pid is the program's own: the wrappers exec).

        ``cpu_quota``: set the host's quota (shared by all its processes) before starting.  Other keyword
        arguments go to subprocess.Popen (env, stdout, cwd, ...); by default the child gets a session of its own
        so a Ctrl-C at the terminal reaches only the test process, which then cleans up.
        """
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.exec_argv(host, argv, cpu_quota=cpu_quota), **popen_kwargs)
        self._procs.append((host, proc))
        return proc

    def run(self, host: str, argv: Sequence[str], *, cpu_quota: float | None = None, timeout: float = 60.0,
            check: bool = False, capture_output: bool = True, text: bool = True,
            **run_kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` to completion (output captured as text by default)."""
        run_kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.exec_argv(host, argv, cpu_quota=cpu_quota), timeout=timeout, check=check,
                              capture_output=capture_output, text=text, **run_kwargs)

    def pids(self, host: str) -> list[int]:
        """Every process in the host's network namespace."""
        return netns.pids(self.netns(host))

    def kill_host(self, host: str) -> None:
        """SIGKILL every process in the host's namespace (a crashed machine); the host stays and can run more."""
        self._require_running()
        netns.kill_all(self.netns(host))
        self._reap(host)

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise HarnessError("cluster is not running (use `with EmulatedCluster(...)` or .start())")


# --------------------------------------------------------------------------- registry, atexit, signals, leftovers

def live_clusters() -> list[EmulatedCluster]:
    with _LOCK:
        return list(_LIVE.values())


def _live_tags() -> set[str]:
    with _LOCK:
        return set(_LIVE)


def remove_leftovers() -> list[str]:
    """Delete namespaces and cgroups of runs that are over (dead pid, or ours but no cluster open); their names."""
    tags = _live_tags()
    return netns.remove_stale(tags) + cgroups.remove_stale(tags)


def _register(cluster: EmulatedCluster) -> None:
    global _ATEXIT_REGISTERED
    with _LOCK:
        _LIVE[cluster.tag] = cluster
        if not _ATEXIT_REGISTERED:
            atexit.register(_close_all)
            _ATEXIT_REGISTERED = True
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                # an ignored signal stays ignored: it does not end the process, so it must not end the clusters
                if sig not in _PREVIOUS_HANDLERS and signal.getsignal(sig) != signal.SIG_IGN:
                    _PREVIOUS_HANDLERS[sig] = signal.signal(sig, _on_signal)


def _unregister(cluster: EmulatedCluster) -> None:
    with _LOCK:
        _LIVE.pop(cluster.tag, None)
        if not _LIVE and threading.current_thread() is threading.main_thread():
            for sig, previous in list(_PREVIOUS_HANDLERS.items()):
                if signal.getsignal(sig) is _on_signal:
                    signal.signal(sig, previous)
                del _PREVIOUS_HANDLERS[sig]


def _close_all() -> None:
    for cluster in live_clusters():
        cluster._closed = False  # a close interrupted by the signal is started over (every step is idempotent)
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - best effort at exit; the next start removes what is left
            pass


def _on_signal(signum, frame) -> None:
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    _close_all()
    if callable(previous):
        previous(signum, frame)  # e.g. SIGINT -> KeyboardInterrupt
    else:  # SIG_DFL: die of the signal as we would have without the harness
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
