"""Deployment: the one-machine WAN testbed (`deploy.wan`) and containers: the image, its
local base, and a cluster started and removed through the Docker engine (`deploy.cluster`)."""
