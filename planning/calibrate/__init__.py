"""`hexgen calibrate`: measure this machine's devices, links and the engine's own steps, and write the
device file the cluster file reads."""
