"""A loopback `Cluster` in which some workers are hostile (`hostile_worker.py`): started
like any other, by name, with the hostile program in place of `archipelago`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.multiproc.cluster import Cluster
from tests.multiproc.hostile_worker import hostile_command


@dataclass
class HostileCluster(Cluster):
    """`hostile`: worker name -> (mode, first corrupted step), for the workers started by
    `start_worker` under that name."""

    hostile: dict[str, tuple[str, int]] = field(default_factory=dict)

    def _command(self, args: list[str], host: str | None) -> list[str]:
        name = args[args.index("--name") + 1] if "--name" in args else ""
        if args[:1] == ["worker"] and name in self.hostile:
            mode, from_step = self.hostile[name]
            return hostile_command(mode, from_step, args)
        return super()._command(args, host)
