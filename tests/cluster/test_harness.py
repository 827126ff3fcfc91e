"""The emulated-cluster harness itself: reachability, isolation, shaping, CPU quotas, kill_host, clean-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from planning.emulation import cgroups, netns
from planning.emulation.harness import EmulatedCluster, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-I", "-c"]  # isolated: no site-packages scan, fast start

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()
    print(s.getsockname()[1], flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(("hello from %s to %s" % (sys.argv[2], peer[0])).encode()); c.close()
""")
CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        print("OK", c.recv(1000).decode())
    except OSError as e:
        print("ERR", type(e).__name__)
""")
RECEIVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()
    print(s.getsockname()[1], flush=True)
    while True:
        c, _ = s.accept()
        want, got = int(c.recv(32).split(b"\\n")[0]), 0
        while got < want:
            chunk = c.recv(1 << 20)
            if not chunk: break
            got += len(chunk)
        c.sendall(b"k"); c.close()
""")
SENDER = textwrap.dedent("""
    import socket, sys, time
    size = int(sys.argv[3])
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    c.sendall(b"%-31d\\n" % size)
    t0 = time.perf_counter()
    c.sendall(b"x" * size)
    assert c.recv(1) == b"k"
    print(time.perf_counter() - t0)
""")
SPIN = textwrap.dedent("""
    import sys, time
    cpu0, n = time.process_time(), 0
    end = time.perf_counter() + float(sys.argv[1])
    while time.perf_counter() < end:
        for _ in range(1000): n += 1
    print(n, time.process_time() - cpu0)
""")
SLEEP = "import time; time.sleep(1000)"
FORKER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)', "
          "sys.argv[1]]); time.sleep(1000)")


def start_server(cluster, host, script, bind, *args):
    proc = cluster.popen(host, [*PY, script, bind, *args], stdout=subprocess.PIPE, text=True)
    port = proc.stdout.readline().strip()
    assert port.isdigit(), f"server on {host} did not start: {port!r}"
    return int(port)


def wait_for(predicate, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pgrep(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def harness_leftovers(prefix: str) -> list[str]:
    return [n for n in netns.list_netns() if n.startswith(prefix)] + \
        [n for n in cgroups.list_groups() if n.startswith(prefix)]


# ---------------------------------------------------------------------------------------------- 1. reachability

def test_hosts_talk_by_namespace_addresses_and_nothing_is_in_the_root_namespace(emulated_cluster):
    root_links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    root_links_before = {line.split(":")[1].strip() for line in root_links_before.splitlines()}
    cluster = emulated_cluster(["a", "b"])
    port = start_server(cluster, "a", ECHO_SERVER, "0.0.0.0", "a")

    out = cluster.run("b", [*PY, CLIENT, cluster.address("a"), str(port)], check=True).stdout
    assert out.strip() == f"OK hello from a to {cluster.address('b')}"        # b -> a by address, source is b's
    assert cluster.run("a", [*PY, CLIENT, "127.0.0.1", str(port)]).stdout.startswith("OK")  # a's own loopback
    # b's 127.0.0.1 is b's own loopback: a's server is not there
    assert cluster.run("b", [*PY, CLIENT, "127.0.0.1", str(port)]).stdout.strip() == "ERR ConnectionRefusedError"

    addrs = cluster.run("a", ["ip", "-o", "-4", "addr"]).stdout
    assert f"{cluster.address('a')}/24" in addrs and "eth0" in addrs and "lo" in addrs
    root_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    for addr in cluster.addresses().values():
        assert addr not in root_addrs
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert {line.split(":")[1].strip() for line in root_links.splitlines()} <= root_links_before
    assert set(cluster.all_netns()) <= set(netns.list_netns())


# --------------------------------------------------------------------------------------------------- 2. shaping

def transfer_seconds(cluster, src, dst, size, port):
    out = cluster.run(src, [*PY, SENDER, cluster.address(dst), str(port), str(size)], check=True, timeout=30)
    return float(out.stdout)


def test_links_are_shaped_per_pair_and_set_bandwidth_changes_them(emulated_cluster):
    size = 3_000_000
    cluster = emulated_cluster(["a", "b", "c"], bandwidth_mbit={("a", "b"): 20, ("a", "c"): 1000})
    assert cluster.bandwidth("a", "b") == 20 and cluster.bandwidth("b", "a") == 20
    assert cluster.bandwidth("b", "c") is None
    port_b = start_server(cluster, "b", RECEIVER, cluster.address("b"))
    port_c = start_server(cluster, "c", RECEIVER, cluster.address("c"))
    port_a = start_server(cluster, "a", RECEIVER, cluster.address("a"))

    slow = transfer_seconds(cluster, "a", "b", size, port_b)
    fast = transfer_seconds(cluster, "a", "c", size, port_c)
    ideal_slow = size * 8 / 20e6
    print(f"\n3 MB a->b @20 Mbit/s: {slow:.3f} s (size/bandwidth {ideal_slow:.3f} s); a->c @1000 Mbit/s: {fast:.3f} s")
    assert 0.7 * ideal_slow < slow < 1.3 * ideal_slow, cluster.tc_show("a")
    assert fast < slow / 5

    cluster.set_bandwidth("a", "b", 40)
    ideal = size * 8 / 40e6
    there, back = transfer_seconds(cluster, "a", "b", size, port_b), transfer_seconds(cluster, "b", "a", size, port_a)
    print(f"after set_bandwidth 40 Mbit/s: a->b {there:.3f} s, b->a {back:.3f} s (size/bandwidth {ideal:.3f} s)")
    assert 0.7 * ideal < there < 1.3 * ideal and 0.7 * ideal < back < 1.3 * ideal

    cluster.set_bandwidth("a", "b", None)  # unshaped again
    assert cluster.bandwidth("a", "b") is None
    assert transfer_seconds(cluster, "a", "b", size, port_b) < slow / 5


# ----------------------------------------------------------------------------------------------- 3. CPU quota

def test_cpu_quota_slows_a_cpu_bound_loop(emulated_cluster):
    """Both loops run side by side, each in a host cgroup of the same (high) weight, so that other work on the
    machine does not decide the result: "free" has no quota, "limited" a quarter of a core.  If the machine is so
    busy that even "free" gets less than 0.8 of a core, the measurement is repeated (at most 3 times)."""
    cluster = emulated_cluster(["free", "limited"], need_cpu_quota=True)
    cluster.set_cpu_quota("free", None)
    cluster.set_cpu_quota("limited", 0.25)
    assert cluster.cpu_quota("limited") == pytest.approx(0.25) and cluster.cpu_quota("free") is None
    seconds = 2.0
    for _attempt in range(3):
        free = cluster.popen("free", [*PY, SPIN, str(seconds)], stdout=subprocess.PIPE, text=True)
        limited = cluster.popen("limited", [*PY, SPIN, str(seconds)], stdout=subprocess.PIPE, text=True)
        wait_for(lambda: cluster.cgroup("limited") in Path(f"/proc/{limited.pid}/cgroup").read_text(),
                 what="the limited loop to be in its cgroup")  # the wrapper joins, then execs
        (n_free, cpu_free), (n_limited, cpu_limited) = [map(float, p.communicate(timeout=30)[0].split())
                                                        for p in (free, limited)]
        ratio = n_free / n_limited
        print(f"\nspin {seconds} s side by side: unconstrained {n_free:.0f} iterations ({cpu_free / seconds:.2f} "
              f"of a core), quota 0.25: {n_limited:.0f} ({cpu_limited / seconds:.2f} of a core): {ratio:.2f}x slower")
        assert cpu_limited / seconds < 0.25 * 1.25  # the quota is a hard cap
        if cpu_free / seconds >= 0.8:
            break
    if cpu_free / seconds >= 0.8:
        assert 2.5 < ratio < 6
    else:  # the machine never left "free" a core: at least the speeds must follow the CPU each got
        assert ratio > 1.5 and 0.6 < ratio / (cpu_free / cpu_limited) < 1.6
    assert cluster.cpu_stat("limited")["nr_throttled"] > 0


# ----------------------------------------------------------------------------------------------- 4. clean-up

def test_exception_inside_the_context_still_cleans_up_everything(emulated_cluster):
    emulated_cluster(["x"], need_cpu_quota=True).close()  # only for the skip checks
    marker = f"hxmark{uuid.uuid4().hex[:10]}"
    procs = []
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(["a", "b"], cpu_quota={"b": 0.5}) as cluster:
            prefix = cluster.prefix
            procs.append(cluster.popen("a", [*PY, FORKER, marker]))
            procs.append(cluster.popen("b", [*PY, FORKER, marker]))
            cluster.popen("b", ["sleep", "1000"])
            wait_for(lambda: len(pgrep(marker)) == 4, what="4 marked processes")
            assert cluster.cgroup("b") in cgroups.list_groups()
            raise RuntimeError("boom")
    assert harness_leftovers(prefix) == []
    assert pgrep(marker) == []
    assert all(p.returncode == -signal.SIGKILL for p in procs)


def test_leftovers_of_dead_runs_are_removed_at_start_and_live_runs_are_kept(emulated_cluster):
    """A namespace (with a process in it) and a cgroup named like ours but owned by no open cluster, and a namespace
    of a dead pid, are removed by the next start; one of another live process (pid 1) is kept.  (The first kind is
    stale to this process only, so a concurrent test run cannot remove it while this test sets it up.)"""
    skip = skip_reason(cpu_quota=True)
    if skip:
        pytest.skip(skip)
    tag = uuid.uuid4().hex[:6]
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 7  # no process can have it
    ours, dead, live = f"hxc-{os.getpid()}-{tag}-a", f"hxc-{dead_pid}-{tag}--switch", f"hxc-1-{tag}-a"
    made_ns, sleeper = [], None
    try:
        for name in (ours, live):
            netns.add(name)
            made_ns.append(name)
            cgroups.create(name)
        sleeper = subprocess.Popen(cgroups.join_argv(ours, netns.exec_argv(ours, ["sleep", "1000"])),
                                   start_new_session=True)
        wait_for(lambda: netns.pids(ours) and cgroups.procs(ours), what="sleeper in the leftover namespace")
        try:
            netns.add(dead)
        except netns.HarnessError:
            pass  # a concurrent run can remove it at any moment: it is stale to everyone
        made_ns.append(dead)

        cluster = emulated_cluster(["a"])
        assert not {ours, dead} & set(netns.list_netns())
        assert ours not in cgroups.list_groups()
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert live in netns.list_netns() and live in cgroups.list_groups()
        assert set(cluster.all_netns()) <= set(netns.list_netns())
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        for name in made_ns:
            netns.delete(name)
            cgroups.remove(name)


DRIVER = textwrap.dedent("""
    import faulthandler, signal, sys, time
    faulthandler.register(signal.SIGUSR1)  # the test dumps our stacks if we hang
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job inherits SIG_IGN)
    sys.path.insert(0, sys.argv[1])
    from planning.emulation.harness import EmulatedCluster
    cluster = EmulatedCluster(["a", "b"], cpu_quota={"a": 0.5}).start()
    p = cluster.popen("a", [sys.executable, "-c", "import time; time.sleep(1000)", sys.argv[2]])
    print(cluster.prefix, p.pid, flush=True)
    try:
        time.sleep(1000)
    except KeyboardInterrupt:  # the harness cleaned up, then handed SIGINT on
        sys.exit(130)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_test_process_killed_by_a_signal_leaves_nothing_behind(emulated_cluster, sig):
    """SIGTERM / SIGINT: the handlers clean up.  SIGKILL: nothing can run, the next cluster's start cleans up."""
    skip = skip_reason(cpu_quota=True)
    if skip:
        pytest.skip(skip)
    marker = f"hxmark{uuid.uuid4().hex[:10]}"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(REPO), marker], stdout=subprocess.PIPE, text=True)
    try:
        prefix, child = driver.stdout.readline().split()
        children = lambda: [p for p in pgrep(marker) if p != driver.pid]  # noqa: E731 - the driver has it too
        assert harness_leftovers(prefix)
        wait_for(lambda: children() == [int(child)], what="the driver's child")  # pgrep can miss one mid-exec
        driver.send_signal(sig)
        try:
            driver.wait(timeout=20)
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGUSR1)
            time.sleep(1)
            raise
        if sig == signal.SIGKILL:
            emulated_cluster(["c"])  # orphans (stale to every process: a concurrent run may get there first)...
        else:
            assert driver.returncode == (130 if sig == signal.SIGINT else -sig)  # the signal went on to its old handler
        assert harness_leftovers(prefix) == []
        wait_for(lambda: children() == [], timeout=5, what="the driver's child to be gone")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


# ---------------------------------------------------------------------------------------------- 5. kill_host

def test_kill_host_kills_every_process_in_its_namespace_and_only_there(emulated_cluster):
    marker = f"hxmark{uuid.uuid4().hex[:10]}"
    cluster = emulated_cluster(["a", "b"])
    forker = cluster.popen("a", [*PY, FORKER, marker])
    other = subprocess.Popen(cluster.exec_argv("a", ["sleep", "1000"]), start_new_session=True)  # not tracked
    bystander = cluster.popen("b", [*PY, SLEEP, marker])
    wait_for(lambda: len(pgrep(marker)) == 3 and len(cluster.pids("a")) == 3, what="processes on a and b")

    cluster.kill_host("a")
    assert cluster.pids("a") == []
    assert forker.returncode == -signal.SIGKILL and other.wait(timeout=5) == -signal.SIGKILL
    assert pgrep(marker) == [bystander.pid] and bystander.poll() is None
    assert cluster.run("a", ["true"]).returncode == 0  # the host is still there and can run again
