"""hexcore: the engine that serves one model split over asymmetric TP/PP replicas.

Rooms: engine/ (requests, scheduling, replicas, failover), executor/ (worker specs, messages and
processes), worker/ (what runs in a worker process), model/ (the Llama stage and its parallel layers),
kernels/ (per-device kernel choice and the C++ CPU loops). At the top: the deployment file
(config.py), device and backend choices (hardware.py), and the public request and output types."""
