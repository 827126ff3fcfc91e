"""Per-destination bandwidth on a host's egress: an htb root, one class per shaped destination, u32 filters.

On host X's ``eth0``::

    tc qdisc add dev eth0 root handle 1: htb                       # unclassified traffic: sent directly, unshaped
    tc class replace dev eth0 parent 1: classid 1:1NN htb rate R ceil R burst B cburst B quantum Q
    tc filter add dev eth0 parent 1: protocol ip prio PP u32 match ip dst <addr of Y>/32 flowid 1:1NN

so X -> Y runs at R; Y's own qdisc shapes Y -> X.  A host talking to itself goes over ``lo`` and is never shaped.
Each destination has a filter priority of its own, so unshaping a pair deletes exactly its filter.
(netem is not available here; htb needs only sch_htb and cls_u32.)
"""

from __future__ import annotations

from .netns import TC, sh

DEV = "eth0"
_QUANTUM = 60000  # bytes; explicit so htb does not warn about rate/r2q (it only matters between classes)


def _classid(dst_index: int) -> str:
    return f"1:{0x100 + dst_index:x}"


def _prio(dst_index: int) -> str:
    return str(10 + dst_index)


def _burst_bytes(mbit: float) -> int:
    # 2 ms worth of bytes, at least 32 KiB: veth hands htb GSO super-packets of up to 64 KiB
    return max(32 * 1024, int(mbit * 1e6 / 8 * 0.002))


def init(ns: str) -> None:
    sh([TC, "-n", ns, "qdisc", "replace", "dev", DEV, "root", "handle", "1:", "htb"])


def set_rate(ns: str, dst_index: int, dst_addr: str, mbit: float | None, *, existed: bool) -> None:
    """Shape ns -> dst at ``mbit`` Mbit/s (10^6 bit/s), or remove its shaping (None)."""
    classid, prio = _classid(dst_index), _prio(dst_index)
    if mbit is None:
        if existed:
            sh([TC, "-n", ns, "filter", "del", "dev", DEV, "parent", "1:", "protocol", "ip", "prio", prio])
            sh([TC, "-n", ns, "class", "del", "dev", DEV, "classid", classid])
        return
    if mbit <= 0:
        raise ValueError(f"bandwidth must be > 0 Mbit/s, got {mbit}")
    rate = f"{max(1, int(round(mbit * 1000)))}kbit"
    burst = str(_burst_bytes(mbit))
    sh([TC, "-n", ns, "class", "replace", "dev", DEV, "parent", "1:", "classid", classid, "htb",
        "rate", rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", str(_QUANTUM)])
    if not existed:
        sh([TC, "-n", ns, "filter", "add", "dev", DEV, "parent", "1:", "protocol", "ip", "prio", prio,
            "u32", "match", "ip", "dst", f"{dst_addr}/32", "flowid", classid])


def show(ns: str) -> str:
    """tc's view of the host's qdisc, classes (with byte counters) and filters, for debugging."""
    parts = []
    for what in ("qdisc", "class", "filter"):
        parts.append(sh([TC, "-s", "-n", ns, what, "show", "dev", DEV] + (["parent", "1:"] if what == "filter" else []),
                        check=False).stdout)
    return "".join(parts)
