"""`hexgen fidelity`: the cost model and simulator against the real engine on the same trace."""
