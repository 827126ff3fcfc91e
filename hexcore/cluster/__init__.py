"""Joining hosts into one deployment: the head's authenticated cluster port, the node agent that runs
on every other host (`hexgen node`), their typed messages, and what a host reports about itself.
Collectives and pipeline sends stay torch.distributed; this room only starts, watches and stops
workers on other hosts and connects them back to the driver."""
