"""Deployment: the one-machine WAN testbed (`deploy.wan`) and, later, images and compose files."""
