"""How the driver reaches its workers: a deployment resolved into worker specs, the typed messages
they exchange, the rendezvous of each replica's torch.distributed world, and starting, watching and
stopping the worker processes."""
