"""Planning: from a job spec, the free workers and their measured links to a plan.

Pure computation over `opdag` graphs and `compressors` policies: job specs, the bandwidth
matrix, the workload estimator, OP-Fence and the plans it makes. Nothing here talks to the
network or the store, so the CLI may import it without starting the service.
"""
