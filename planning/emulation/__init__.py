"""An emulated multi-host cluster on one Linux machine: hosts as network namespaces on a bridge, links shaped
with tc htb, CPU quotas with cgroup v1 (harness.py). Used by the tests (fixture ``emulated_cluster``) and by
planning/experiments/emulated_cluster.py."""
