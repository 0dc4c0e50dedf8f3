"""The worker: serves a stage of a job and exchanges tensors with its peers."""
