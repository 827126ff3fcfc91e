"""Scripts that reproduce the paper's comparisons in simulation (see BENCHMARKS.md)."""
