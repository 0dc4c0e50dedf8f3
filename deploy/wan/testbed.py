"""`Testbed`: a spec made real on this machine. One network namespace per host, each
joined by a veth to one bridge in the root namespace; the bridge holds the subnet's first
address, so a process in the root namespace (a coordinator, say) reaches every host and
is reached by them. Each host shapes its own egress per destination (`deploy.wan.shaping`);
paths with latency go through the delay layer (`deploy.wan.delay`).

    with Testbed(spec) as tb:
        worker = tb.popen("eu1", ["archipelago", "worker", ...])

Leaving the block, by any way (an exception, Ctrl-C, SIGTERM), removes everything the
testbed made; a signal is re-raised once that is done. A testbed is never built over the
leftovers of another of the same name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import signal
import subprocess
from collections.abc import Iterator, Sequence
from types import FrameType, TracebackType
from typing import IO, Any

from deploy.wan import cleanup, firewall, iproute
from deploy.wan.delay import DelayConfig, TunnelConfig
from deploy.wan.errors import TestbedError
from deploy.wan.layout import INNER_VETH, TUNNEL, HostLayout, TestbedLayout, plan_layout
from deploy.wan.shaping import shaping_commands
from deploy.wan.spec import TestbedSpec
from deploy.wan.state import TestbedState, delay_log_path, read_state, write_state
from deploy.wan.subproc import module_command, module_env

DELAY_START_TIMEOUT_S = 10.0
PROCESS_STOP_GRACE_S = 2.0


class TestbedInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a testbed was open; raised after it is removed.

    A KeyboardInterrupt, so that `except Exception` in the body does not swallow it and the
    `archipelago` command reports it as an interruption.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class Testbed:
    """Hosts in namespaces with shaped links between them, built from a `TestbedSpec`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, spec: TestbedSpec, *, detach: bool = False) -> None:
        """`detach`: the testbed outlives this process (`archipelago testbed up`); it is
        then removed by `archipelago testbed down`, not when this object is done with."""
        self.spec = spec
        self.layout: TestbedLayout = plan_layout(spec)
        self._detach = detach
        self._owned = True  # False for a view of a running testbed (`attach`)
        self._built = False
        self._delay: subprocess.Popen[bytes] | None = None
        self._children: list[subprocess.Popen[Any]] = []
        self._saved_handlers: dict[int, Any] = {}

    @classmethod
    def attach(cls, name: str) -> Testbed:
        """A view of a testbed that is already up, from its record; it removes nothing."""
        state = read_state(name)
        if state is None:
            raise TestbedError(
                f"no testbed named {name!r} is up "
                "(start one with `archipelago testbed up SPEC.yaml`)"
            )
        tb = cls(state.testbed_spec())
        tb._owned = False
        tb._built = True
        return tb

    # --- what the testbed offers ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.spec.hosts

    @property
    def bridge_address(self) -> ipaddress.IPv4Address:
        """The root namespace's address on the testbed (the subnet's first)."""
        return self.layout.bridge_address

    def region_of(self, host: str) -> str:
        return self.spec.region_of(host)

    def address(self, host: str) -> ipaddress.IPv4Address:
        return self.layout.host(host).address

    def namespace(self, host: str) -> str:
        return self.layout.host(host).namespace

    def exec_args(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `host`'s namespace; it is stopped when the testbed goes."""
        if not self._built:
            raise TestbedError(f"testbed {self.name!r} is not up")
        child: subprocess.Popen[Any] = subprocess.Popen(self.exec_args(host, argv), **kwargs)
        self._children = [c for c in self._children if c.poll() is None]
        self._children.append(child)
        return child

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        self._catch_signals()
        try:
            if not self._built:
                self.up()
        except BaseException:
            self._restore_signals()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            with _signals_deferred():
                if self._owned and not self._detach:
                    self._remove()
                else:
                    self._stop_children()  # the testbed itself stays up
        finally:
            self._restore_signals()

    def up(self) -> None:
        """Build the testbed; on any failure remove what was built, then re-raise."""
        iproute.require_privileges()
        self._refuse_leftovers()
        self._refuse_busy_subnet()
        write_state(self._state())  # before anything exists, so `down` can find a half-build
        try:
            self._build_bridge()
            for host in self.layout.hosts:
                self._build_host(host)
            for host in self.layout.hosts:
                for argv in shaping_commands(self.spec, self.layout, host.name):
                    iproute.run(argv)
            if self.spec.has_latency:
                self._start_delay_layer()
            self._built = True
        except BaseException:
            with _signals_deferred():
                self._remove()
            raise

    def down(self) -> None:
        """Remove everything this testbed made. Idempotent; signals wait until it is done.

        A view made by `attach` removes nothing but the processes it started."""
        with _signals_deferred():
            if self._owned:
                self._remove()
            else:
                self._stop_children()

    # --- building ------------------------------------------------------------------------

    def _state(self, delay_pid: int | None = None) -> TestbedState:
        return TestbedState(
            name=self.name,
            spec=self.spec.to_dict(),
            owner_pid=os.getpid(),
            detached=self._detach,
            delay_pid=delay_pid,
        )

    def _refuse_leftovers(self) -> None:
        found = cleanup.leftovers(self.name)
        if found:
            listed = ", ".join(found[:3]) + (
                f" and {len(found) - 3} more" if len(found) > 3 else ""
            )
            raise TestbedError(
                f"testbed {self.name!r} already exists or a previous run left pieces of it "
                f"({listed}); remove them with `archipelago testbed down {self.name}`"
            )

    def _refuse_busy_subnet(self) -> None:
        users = iproute.subnet_users(self.spec.subnet)
        if users:
            raise TestbedError(
                f"subnet {self.spec.subnet} is already in use on this machine "
                f"({'; '.join(users)}); choose another with `subnet:` in the spec"
            )

    def _build_bridge(self) -> None:
        bridge = self.layout.bridge
        iproute.run(["ip", "link", "add", "name", bridge, "type", "bridge"])
        iproute.run(["ip", "link", "set", "dev", bridge, "addrgenmode", "none"])
        iproute.run(["ip", "addr", "add", self.layout.interface_cidr, "dev", bridge])
        iproute.run(["ip", "link", "set", "dev", bridge, "up"])
        firewall.open_forwarding(self.name, bridge)

    def _build_host(self, host: HostLayout) -> None:
        ns, prefix = host.namespace, self.spec.subnet.prefixlen
        iproute.run(["ip", "netns", "add", ns])
        iproute.run(
            ["ip", "link", "add", "name", host.outer_veth, "type", "veth",
             "peer", "name", INNER_VETH, "netns", ns]
        )  # fmt: skip
        # No IPv6 link-local addresses: the shaping filters match IPv4, and IPv6 between
        # hosts would slip past them.
        outer = ["ip", "link", "set", "dev", host.outer_veth]
        iproute.run([*outer, "addrgenmode", "none"])
        iproute.run([*outer, "master", self.layout.bridge, "up"])
        inner = ["ip", "-n", ns, "link", "set", "dev", INNER_VETH]
        iproute.run([*inner, "addrgenmode", "none"])
        iproute.run(["ip", "-n", ns, "addr", "add", f"{host.address}/{prefix}", "dev", INNER_VETH])
        iproute.run([*inner, "up"])
        iproute.run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])

    def _delay_config(self) -> DelayConfig:
        delays = {}
        tunnelled: set[str] = set()
        for src in self.layout.hosts:
            for dst in self.layout.hosts:
                if src.name != dst.name:
                    latency = self.spec.path(src.name, dst.name).latency_s
                    if latency > 0:
                        delays[(src.address, dst.address)] = latency
                        tunnelled |= {src.name, dst.name}
        tunnels = tuple(
            TunnelConfig(h.namespace, TUNNEL, h.address)
            for h in self.layout.hosts
            if h.name in tunnelled
        )
        return DelayConfig(tunnels, delays)

    def _start_delay_layer(self) -> None:
        args = ["--testbed", self.name]
        if not self._detach:
            args.append("--die-with-parent")
        log_path = delay_log_path(self.name)
        with log_path.open("wb") as log:
            # A session of its own: a Ctrl-C at the terminal is for the testbed's owner,
            # which then stops the layer in order.
            self._delay = subprocess.Popen(
                module_command("deploy.wan.delay", *args),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=module_env(),
                start_new_session=True,
            )
        assert self._delay.stdin is not None and self._delay.stdout is not None
        write_state(self._state(self._delay.pid))
        self._delay.stdin.write(self._delay_config().to_json().encode())
        self._delay.stdin.close()
        line = _read_line(self._delay.stdout, DELAY_START_TIMEOUT_S)
        self._delay.stdout.close()
        if line.strip() != b"ready":
            reason = log_path.read_text(errors="replace").strip().splitlines()
            raise TestbedError(
                "the delay layer did not start: " + (reason[-1] if reason else "no output")
            )

    # --- removing ------------------------------------------------------------------------

    def _stop_children(self) -> None:
        for child in self._children:
            _stop_child(child)
        self._children = []

    def _remove(self) -> None:
        self._stop_children()
        if self._delay is not None:
            _stop_child(self._delay)
            self._delay = None
        self._built = False
        cleanup.remove_testbed(self.name)

    # --- signals -------------------------------------------------------------------------

    def _catch_signals(self) -> None:
        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise TestbedInterrupted(signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._saved_handlers[signum] = signal.signal(signum, interrupt)
            except ValueError:
                return  # not the main thread: signals are not ours to handle

    def _restore_signals(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers = {}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while removing, so a second Ctrl-C cannot leave half a
    testbed; a signal that arrived meanwhile is delivered afterwards."""
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except ValueError:
        blocked = None
    try:
        yield
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _read_line(stream: IO[bytes], timeout_s: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if ready else b""


def _stop_child(child: subprocess.Popen[Any]) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=PROCESS_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
