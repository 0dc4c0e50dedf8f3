"""Tensor compressors for slow links: pure functions of tensors, no network."""
