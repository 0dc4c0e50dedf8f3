"""The coordinator's web dashboard and its Prometheus metrics."""
