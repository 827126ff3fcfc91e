"""The scheduler: a per-replica dynamic program over TP groups and layer counts (replica_dp.py), the
scoring of device partitions (partitions.py) and the genetic search over partitions (genetic.py)."""
