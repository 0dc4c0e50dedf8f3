"""The operator DAG: capture a torch model as a graph of allow-listed operators, annotate
costs, cut it into stages, and rebuild and run each stage from the IR alone.

Knows nothing of the network.
"""
