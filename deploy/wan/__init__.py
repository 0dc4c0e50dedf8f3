"""The one-machine WAN testbed: hosts in network namespaces, joined through one bridge by
veths whose egress is shaped per destination with `tc htb`, and a delay layer of its own
for latency (this kernel has no `netem`).

- `spec`: the YAML testbed spec and its frozen dataclasses;
- `layout`: names and addresses; `shaping`: the tc/ip commands per host;
- `testbed`: `Testbed`, which builds, offers and removes it; `cleanup`, `state`: leftovers
  and the record of a running one;
- `delay`: the delay layer; `iperf`, `measure`: measuring what was built;
- `cli`: `archipelago testbed up|down|measure`.
"""

from deploy.wan.errors import SpecError, TestbedError
from deploy.wan.spec import LinkSpec, PathSpec, RegionSpec, TestbedSpec, load_spec, parse_spec
from deploy.wan.testbed import Testbed, TestbedInterrupted

__all__ = [
    "LinkSpec",
    "PathSpec",
    "RegionSpec",
    "SpecError",
    "Testbed",
    "TestbedError",
    "TestbedInterrupted",
    "TestbedSpec",
    "load_spec",
    "parse_spec",
]
