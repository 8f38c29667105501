"""vqlab's analysis package: studies over finished runs (codebook utilization, hierarchical
k-means versus radix decomposition, integer-code behaviour), logged to MLflow with figures."""
