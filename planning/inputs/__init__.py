"""The planner's inputs: the cluster file, the GPU catalog (device and link specs), model dimensions and
the workload."""
