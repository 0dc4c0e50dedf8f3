"""The WAN testbed's spec, names and shaping commands: everything that needs no root."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from archipelago.cli import main
from deploy.wan import iproute
from deploy.wan.errors import SpecError, TestbedError
from deploy.wan.layout import owner_of_namespace, plan_layout
from deploy.wan.shaping import shaping_commands
from deploy.wan.spec import format_rate, load_spec, parse_duration, parse_rate, parse_spec

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "testbeds" / "two-regions.yaml"

TWO_REGIONS: dict[str, Any] = {
    "name": "two-regions",
    "regions": {
        "eu": {"hosts": ["eu1", "eu2"], "bandwidth": "100mbit"},
        "us": {"hosts": ["us1", "us2"], "bandwidth": "1gbit"},
    },
    "links": [{"between": ["eu", "us"], "bandwidth": "20mbit", "latency": "20ms"}],
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """TWO_REGIONS with dotted-path fields replaced (`None` deletes the field)."""
    data = copy.deepcopy(TWO_REGIONS)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return data


def test_spec_gives_every_directed_pair_its_rate_and_latency() -> None:
    spec = parse_spec(TWO_REGIONS)
    assert spec.hosts == ("eu1", "eu2", "us1", "us2")
    assert spec.subnet == ipaddress.IPv4Network("10.77.0.0/24")
    assert spec.region_of("us2") == "us"
    assert spec.path("eu1", "eu2").bandwidth_bps == 100_000_000
    assert spec.path("us2", "us1").bandwidth_bps == 1_000_000_000
    assert spec.path("eu2", "us1").bandwidth_bps == 20_000_000
    assert spec.path("us1", "eu2").latency_s == pytest.approx(0.020)
    assert spec.path("eu1", "eu2").latency_s == 0
    assert spec.has_latency


def test_spec_survives_a_round_trip_through_its_dict() -> None:
    spec = parse_spec(spec_with(default_bandwidth="5mbit", subnet="192.168.40.0/24"))
    assert parse_spec(spec.to_dict()) == spec


def test_example_spec_file_loads() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.name == "two-regions"
    assert len(spec.hosts) == 4


def test_default_bandwidth_covers_pairs_of_regions_not_listed() -> None:
    data = spec_with(default_bandwidth="8mbit", default_latency="50ms")
    data["regions"]["asia"] = {"hosts": ["as1"]}  # one host: no bandwidth inside needed
    spec = parse_spec(data)
    assert spec.path("as1", "eu1").bandwidth_bps == 8_000_000
    assert spec.path("us1", "as1").latency_s == pytest.approx(0.050)
    assert spec.path("eu1", "us1").bandwidth_bps == 20_000_000  # the listed link wins


@pytest.mark.parametrize(
    ("text", "bps"),
    [("500kbit", 500_000), ("20mbit", 20_000_000), ("1gbit", 10**9), ("1.5mbit", 1_500_000)],
)
def test_rates_read_as_tc_writes_them(text: str, bps: int) -> None:
    assert parse_rate(text, "x") == bps
    assert parse_rate(format_rate(bps), "x") == bps


@pytest.mark.parametrize(("text", "seconds"), [("20ms", 0.02), ("250us", 0.00025), (0, 0.0)])
def test_durations_read_in_seconds(text: Any, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


BAD_FIELDS = [
    (
        spec_with(regions__eu__bandwidth="fast"),
        "regions.eu.bandwidth: must be a rate like '100mbit'",
    ),
    (spec_with(regions__eu__bandwidth="100mbps"), "regions.eu.bandwidth: must be a rate"),
    (spec_with(regions__eu__bandwidth=None), "regions.eu.bandwidth: required"),
    (spec_with(regions__eu__bandwith="1gbit"), "regions.eu.bandwith: unknown field"),
    (
        spec_with(regions__us__hosts=["eu1"]),
        "regions.us.hosts[0]: host 'eu1' is already in region 'eu'",
    ),
    (spec_with(regions__us__hosts=["us-1"]), "regions.us.hosts[0]: a host name"),
    (spec_with(regions__us__hosts=[]), "regions.us.hosts: must be a non-empty list"),
    (spec_with(regions={}), "regions: must be a non-empty mapping"),
    (spec_with(regions=None), "regions: required"),
    (spec_with(links__0__bandwidth="20"), "links[0].bandwidth: must be a rate like '100mbit'"),
    (spec_with(links__0__bandwidth=None), "links[0].bandwidth: required"),
    (spec_with(links__0__latency="soon"), "links[0].latency: must be a duration like '20ms'"),
    (spec_with(links__0__latency="9s"), "links[0].latency: '9s' is more than 5 s"),
    (spec_with(links__0__between=["eu", "asia"]), "links[0].between: no region 'asia'"),
    (spec_with(links__0__between=["eu", "eu"]), "links[0].between: a link joins two different"),
    (spec_with(links__0__between="eu-us"), "links[0].between: must be a list of two region names"),
    (spec_with(links="eu-us"), "links: must be a list"),
    (spec_with(links=[]), "links: no link between regions 'eu' and 'us'"),
    (spec_with(name=None), "name: required"),
    (spec_with(name="Two Regions"), "name: must be 1-24 lower-case letters"),
    (spec_with(bandwith="1gbit"), "bandwith: unknown field"),
    (spec_with(subnet="8.8.8.0/24"), "subnet: 8.8.8.0/24 is not inside a private range"),
    (spec_with(subnet="10.77.0.1/24"), "subnet: 10.77.0.1/24 has host bits set"),
    (spec_with(subnet="10.77.0.0/30"), "subnet: 10.77.0.0/30 has no room for 4 hosts"),
    (spec_with(subnet=24), "subnet: must be an IPv4 network"),
    (spec_with(default_bandwidth="lots"), "default_bandwidth: must be a rate"),
    (spec_with(default_latency="5ms"), "default_latency: needs a default_bandwidth"),
]


@pytest.mark.parametrize(("data", "message"), BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_bad_field_is_named(data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert str(err.value).startswith(message), str(err.value)


def test_duplicate_link_points_at_the_first() -> None:
    data = copy.deepcopy(TWO_REGIONS)
    data["links"].append({"between": ["us", "eu"], "bandwidth": "1mbit"})
    with pytest.raises(
        SpecError, match=r"links\[1\]\.between: us and eu are already linked by links\[0\]"
    ):
        parse_spec(data)


def test_a_spec_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SpecError, match="spec: must be a mapping"):
        parse_spec(["name", "x"])


def test_layout_gives_bridge_the_first_address_and_hosts_the_next() -> None:
    layout = plan_layout(parse_spec(TWO_REGIONS))
    assert str(layout.bridge_address) == "10.77.0.1"
    assert [str(h.address) for h in layout.hosts] == [f"10.77.0.{i}" for i in (2, 3, 4, 5)]
    assert layout.host("us1").namespace == "arch-two-regions-us1"
    assert all(owner_of_namespace(h.namespace) == "two-regions" for h in layout.hosts)
    names = [layout.bridge, *(h.outer_veth for h in layout.hosts)]
    assert all(len(n) <= 15 for n in names)  # the kernel's limit on interface names
    assert len(set(names)) == len(names)


def test_namespaces_of_other_programs_belong_to_no_testbed() -> None:
    assert owner_of_namespace("blue") is None
    assert owner_of_namespace("arch-") is None
    assert owner_of_namespace("arch-a-b-c") == "a-b"


def test_each_host_shapes_each_destination_on_the_right_device() -> None:
    spec = parse_spec(TWO_REGIONS)
    cmds = [" ".join(c) for c in shaping_commands(spec, plan_layout(spec), "eu1")]
    classes = [c for c in cmds if " class add " in c]
    filters = [c for c in cmds if " filter add " in c]
    # One class per destination plus a default class on each shaped device.
    assert len(classes) == 3 + 2 and len(filters) == 3
    assert any("dev eth0" in c and "rate 100000000bit ceil 100000000bit" in c for c in classes)
    assert sum("dev wan0" in c and "rate 20000000bit" in c for c in classes) == 2
    assert any("dev eth0" in f and "match ip dst 10.77.0.3/32" in f for f in filters)
    assert any("dev wan0" in f and "match ip dst 10.77.0.5/32" in f for f in filters)
    assert any("route add 10.77.0.4/32 dev wan0 src 10.77.0.2" in c for c in cmds)


def test_without_latency_no_tunnel_is_made() -> None:
    spec = parse_spec(spec_with(links__0__latency=None))
    cmds = [" ".join(c) for c in shaping_commands(spec, plan_layout(spec), "us2")]
    assert not any("wan0" in c for c in cmds)
    assert not spec.has_latency


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iproute.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(iproute.shutil, "which", lambda tool: f"/sbin/{tool}")
    with pytest.raises(TestbedError, match="needs root"):
        iproute.require_privileges()


def test_cli_names_the_bad_field_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("bandwidth: 20mbit", "bandwidth: slow"))
    assert main(["testbed", "up", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "archipelago: error: links[0].bandwidth: must be a rate like '100mbit' (got 'slow')"
    )
