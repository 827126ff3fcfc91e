"""A discrete-event simulator of the engine, replica capacity by simulation, and the evaluation of a
deployment file on a cluster and workload."""
