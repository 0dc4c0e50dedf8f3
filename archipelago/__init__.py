"""Archipelago: train one model across islands of machines joined by slow links."""

__version__ = "0.1.0"
