"""The engine proper, in the driver process: requests in, incremental outputs out. The core loop,
per-replica scheduler and KV block manager, the router across replicas, the supervisor that fails
over and restarts replicas, and the asyncio (server) and offline (LLM) faces."""
