"""Benchmarks: each prints its figures beside a baseline measured in the same run, on the
same machine, as a ratio. Nothing here is a pass/fail test; timings never fail a build."""
