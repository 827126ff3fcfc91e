"""How the driver reaches its workers: a deployment resolved into worker specs, the typed messages
they exchange (each rank's part of a step, as increments to what it already knows), the rendezvous
of each replica's torch.distributed world, and starting, watching and stopping the worker processes."""
