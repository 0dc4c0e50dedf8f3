"""A testbed removes everything it made however its block ends (normally, by an
exception, by SIGINT or SIGTERM), refuses to build over leftovers, and `archipelago
testbed up/down` leave it up and take it down."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from archipelago.cli import main
from deploy.wan import Testbed, TestbedError, iproute, parse_spec
from deploy.wan.layout import bridge_name
from deploy.wan.state import read_state
from deploy.wan.subproc import module_env
from tests.testbed.support import assert_nothing_left, pid_alive, skip_unless_testbed_possible

pytestmark = pytest.mark.testbed
skip_unless_testbed_possible()


def small_spec(name: str, subnet: str, latency: str = "5ms") -> dict[str, Any]:
    return {
        "name": name,
        "subnet": subnet,
        "regions": {"a": {"hosts": ["a1"]}, "b": {"hosts": ["b1"]}},
        "links": [{"between": ["a", "b"], "bandwidth": "10mbit", "latency": latency}],
    }


def test_everything_is_removed_when_the_body_raises() -> None:
    spec = parse_spec(small_spec("archtest-raise", "10.77.252.0/24"))
    with pytest.raises(RuntimeError, match="boom"), Testbed(spec) as tb:
        assert set(tb.hosts) == {"a1", "b1"}
        assert "arch-archtest-raise-a1" in iproute.namespaces()
        state = read_state(tb.name)
        assert state is not None and state.delay_pid is not None
        delay_pid = state.delay_pid
        assert pid_alive(delay_pid)
        sleeper = tb.popen("b1", ["sleep", "60"])
        raise RuntimeError("boom")
    assert_nothing_left("archtest-raise")
    assert not pid_alive(delay_pid)
    assert sleeper.poll() is not None


def test_everything_is_removed_after_a_normal_exit() -> None:
    spec = parse_spec(small_spec("archtest-exit", "10.77.252.0/24", latency="0ms"))
    with Testbed(spec) as tb:
        assert len(iproute.namespaces()) >= 2
        assert tb.exec_args("a1", ["true"]) == [
            "ip",
            "netns",
            "exec",
            "arch-archtest-exit-a1",
            "true",
        ]
        assert subprocess.run(tb.exec_args("a1", ["true"])).returncode == 0
    assert_nothing_left("archtest-exit")
    tb.down()  # idempotent
    assert_nothing_left("archtest-exit")


def test_a_testbed_is_not_built_over_leftovers() -> None:
    name = "archtest-left"
    spec = parse_spec(small_spec(name, "10.77.253.0/24"))
    # What a crashed run might leave: one namespace, nothing else.
    iproute.run(["ip", "netns", "add", f"arch-{name}-a1"])
    try:
        with pytest.raises(TestbedError) as err, Testbed(spec):
            pass
        assert f"`archipelago testbed down {name}`" in str(err.value)
        assert f"arch-{name}-a1" in str(err.value)
        assert bridge_name(name) not in iproute.links()  # refused before building
        assert main(["testbed", "down", name]) == 0
        assert_nothing_left(name)
        assert main(["testbed", "down", name]) == 0  # idempotent
    finally:
        iproute.run(["ip", "netns", "del", f"arch-{name}-a1"], check=False)


def test_cli_up_leaves_it_up_and_down_removes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "archtest-cli"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(small_spec(name, "10.77.254.0/24")))
    try:
        assert main(["testbed", "up", str(spec_file)]) == 0
        out = capsys.readouterr().out
        assert f"arch-{name}-a1" in out and "10.77.254.2" in out and "10.77.254.1" in out
        state = read_state(name)
        assert state is not None and state.detached and state.delay_pid is not None
        assert pid_alive(state.delay_pid)  # the delay layer outlives the command
        assert main(["testbed", "up", str(spec_file)]) == 2  # it is already up
        assert f"archipelago testbed down {name}" in capsys.readouterr().err
        assert main(["testbed", "down", name]) == 0
        assert "removed namespace" in capsys.readouterr().out
        assert not pid_alive(state.delay_pid)
        assert_nothing_left(name)
    finally:
        main(["testbed", "down", name])


SIGNALLED = textwrap.dedent(
    """
    import json, sys, time
    from deploy.wan import Testbed, parse_spec
    with Testbed(parse_spec(json.loads(sys.argv[1]))) as tb:
        tb.popen("a1", ["sleep", "60"])
        print("up", flush=True)
        time.sleep(30)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_testbed_then_is_reraised(signum: signal.Signals) -> None:
    name = f"archtest-{signum.name.lower()}"
    spec = small_spec(name, "10.77.252.0/24")
    child = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=module_env(),
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 20)
        assert ready and child.stdout.readline() == b"up\n", child.stderr
        assert iproute.namespaces()
        child.send_signal(signum)
        _, err = child.communicate(timeout=20)
        assert child.returncode != 0
        assert f"TestbedInterrupted: interrupted by {signum.name}" in err.decode()
        assert_nothing_left(name)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        main(["testbed", "down", name])
