"""What runs inside a worker process (one per device): its main loop, what it keeps of each sequence
between steps, the stage runner that computes one rank's share of a step and passes hidden states on,
and the sampler of the last stage."""
