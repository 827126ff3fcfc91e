"""The cost model: the time and memory of one stage step (stage_cost.py) and of a whole replica
(replica_cost.py), as pure functions."""
