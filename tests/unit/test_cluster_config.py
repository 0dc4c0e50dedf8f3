"""The pure parts of the container cluster: what goes into the image's build context, the
names and labels of what `cluster up` makes, the command line of each container (checked
against the `archipelago` command's own parser), the base image's tag, and the compose
file, which must start the same services the same way. No Docker engine needed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml

from archipelago.cli import build_parser, main
from deploy.base_image import BaseImageSpec
from deploy.cluster import (
    LABEL_CLUSTER,
    ClusterError,
    ClusterSpec,
    container_name,
    coordinator_command,
    environment,
    labels,
    network_name,
    redis_command,
    worker_command,
)
from deploy.image import (
    DOCKERFILE,
    LABEL_ROLE,
    PACKAGES,
    context_files,
    listed_files,
    source_root,
    wheelhouse_key,
    write_context,
)
from deploy.image_requirements import image_requirements

pytestmark = pytest.mark.unit

ROOT = source_root()
TOKEN = "cluster-test-token"
OPERATOR = "cluster-test-operator-token"


def spec(**overrides: object) -> ClusterSpec:
    fields = {"name": "main", "workers": 2, "token": TOKEN, "operator_token": OPERATOR}
    return ClusterSpec(**{**fields, **overrides})  # type: ignore[arg-type]


# -- the build context ------------------------------------------------------------------


def test_context_holds_the_packages_and_metadata_but_not_tests_venv_or_wheels() -> None:
    paths = [
        "pyproject.toml",
        "README.md",
        "Makefile",
        "archipelago/cli.py",
        "coordinator/dashboard/static/app.css",
        "deploy/Dockerfile",
        "deploy/wheels/README.md",
        "deploy/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "deploy/wheels/deps/numpy.whl",
        "tests/unit/test_cli.py",
        "bench/__main__.py",
        "examples/gpt.yaml",
        ".venv/bin/python",
        "worker/__pycache__/main.cpython-311.pyc",
        "proto",  # a stray top-level file named like a package is not a package file
    ]
    assert context_files(paths) == [
        "README.md",
        "archipelago/cli.py",
        "coordinator/dashboard/static/app.css",
        "deploy/Dockerfile",
        "deploy/wheels/README.md",
        "pyproject.toml",
    ]


def test_context_of_this_checkout_has_the_dockerfile_and_what_it_copies() -> None:
    files = context_files(listed_files(ROOT))
    for needed in (DOCKERFILE, "deploy/wheels/README.md", "deploy/image_requirements.py"):
        assert needed in files
    assert "pyproject.toml" in files and "proto/coordinator.proto" in files
    assert not [f for f in files if f.startswith(("tests/", ".venv/", "bench/"))]
    assert not [f for f in files if f.endswith("_pb2.py")]  # generated in the image


def _tar_entries(data: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.mtime, m.uid) for m in tar.getmembers()]


def test_context_tar_is_the_same_bytes_for_the_same_files(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "archipelago").mkdir(parents=True)
    (root / "archipelago" / "cli.py").write_text("print('hi')\n")
    (root / "pyproject.toml").write_text("[project]\n")
    torch = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    torch.write_bytes(b"torch")
    house = tmp_path / "house"
    house.mkdir()
    (house / "numpy-2.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"numpy")
    files = ["archipelago/cli.py", "pyproject.toml", "archipelago/deleted.py"]
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    write_context(first, root=root, files=files, torch_wheel=torch, wheelhouse=house)
    (root / "archipelago" / "cli.py").touch()  # a newer mtime changes nothing
    write_context(second, root=root, files=files, torch_wheel=torch, wheelhouse=house)
    assert first.read_bytes() == second.read_bytes()
    assert _tar_entries(first.read_bytes()) == [
        ("archipelago/cli.py", 0, 0),
        ("pyproject.toml", 0, 0),
        (f"wheels/{torch.name}", 0, 0),
        ("wheels/deps/numpy-2.0-cp311-cp311-manylinux_2_17_x86_64.whl", 0, 0),
    ]


def test_image_requirements_are_pyprojects_dependencies_build_requires_and_grpcio_tools() -> None:
    requirements = image_requirements(ROOT / "pyproject.toml")
    assert requirements[0] == "torch==2.13.0"
    assert "setuptools>=68" in requirements
    assert [r for r in requirements if r.startswith("grpcio-tools")] == ["grpcio-tools==1.85.1"]
    assert not [r for r in requirements if r.startswith(("pytest", "ruff", "mypy"))]


def test_wheelhouse_is_named_by_requirements_torch_and_base() -> None:
    torch = Path("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    key = wheelhouse_key(["numpy>=1.26"], torch, "base:1")
    assert key == wheelhouse_key(["numpy>=1.26"], torch, "base:1")
    assert key != wheelhouse_key(["numpy>=2"], torch, "base:1")
    assert key != wheelhouse_key(["numpy>=1.26"], torch, "base:2")


def test_dockerfile_takes_a_normal_base_and_installs_torch_before_the_sources() -> None:
    text = (ROOT / DOCKERFILE).read_text()
    assert "ARG BASE=python:3.11-slim-bookworm" in text
    # The legacy builder of Docker 20.10 has no RUN --mount.
    assert not [line for line in text.splitlines() if line.startswith("RUN --mount")]
    torch, deps, sources = (
        text.index("wheels/torch-*.whl"),
        text.index("COPY pyproject.toml deploy/image_requirements.py"),
        text.index("FROM environment AS project"),
    )
    assert torch < deps < sources
    # The project stage copies every package the image is built from, one by one.
    for package in PACKAGES:
        assert f"COPY {package}/ {package}/" in text[sources:]


# -- the base image ---------------------------------------------------------------------


def test_base_image_tag_names_its_inputs() -> None:
    base = BaseImageSpec()
    assert base.tag.startswith("archipelago-base:bookworm-minbase-")
    assert base.tag == BaseImageSpec(mirror="http://mirror.example/debian").tag
    assert base.tag != BaseImageSpec(packages=(*base.packages, "curl")).tag
    command = base.debootstrap_command(Path("/tmp/rootfs"))
    assert command[:2] == ["debootstrap", "--variant=minbase"]
    assert "python3.11" in command[2] and "redis-server" in command[2]
    assert command[3:] == ["bookworm", "/tmp/rootfs", "http://deb.debian.org/debian"]


# -- names, labels, command lines -------------------------------------------------------


def test_names_and_labels_say_which_cluster_and_role() -> None:
    assert network_name("main") == "archipelago-main"
    assert container_name("main", "coordinator") == "archipelago-main-coordinator"
    assert container_name("main", "worker", 1) == "archipelago-main-worker-1"
    assert labels("main", "worker") == {LABEL_CLUSTER: "main", LABEL_ROLE: "worker"}


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "Main"},
        {"name": "a b"},
        {"token": "short"},
        {"operator_token": "short-operator"},
        {"operator_token": TOKEN * 2, "token": TOKEN * 2},
    ],
)
def test_spec_refuses_bad_names_and_short_tokens(bad: dict[str, str]) -> None:
    with pytest.raises(ClusterError):
        spec(**bad)


def parsed(command: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """`command` as the `archipelago` command parses it inside the container."""
    monkeypatch.setenv("ARCHIPELAGO_TOKEN", TOKEN)
    assert command[0] == "archipelago"
    return vars(build_parser().parse_args(command[1:]))


def test_coordinator_serves_every_interface_on_redis_with_the_token_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command = coordinator_command(spec())
    args = parsed(command, monkeypatch)
    assert args["host"] == "0.0.0.0" and args["port"] == 7070
    assert args["store"] == "redis://archipelago-main-redis:6379/0"
    assert args["dashboard"] == "0.0.0.0:7080"
    assert TOKEN not in command  # on no command line the host's ps shows
    assert OPERATOR not in command
    assert environment(spec(), "coordinator") == {
        "ARCHIPELAGO_TOKEN": TOKEN,
        "ARCHIPELAGO_OPERATOR_TOKEN": OPERATOR,
    }
    assert parsed(coordinator_command(spec(dashboard=False)), monkeypatch)["dashboard"] == "off"


def test_worker_joins_by_container_name_and_advertises_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command = worker_command(spec(threads=1, gflops=50.0), 1)
    args = parsed(command, monkeypatch)
    assert args["coordinator"] == "archipelago-main-coordinator:7070"
    assert args["listen"] == "0.0.0.0:7071"
    assert args["advertise"] == "archipelago-main-worker-1:7071"
    assert args["name"] == "main-worker-1"
    assert args["threads"] == 1 and args["gflops"] == 50.0
    assert TOKEN not in command
    # A worker's container is a volunteer's: it holds the join token, never the operator's.
    assert environment(spec(), "worker") == {"ARCHIPELAGO_TOKEN": TOKEN}
    # With the authority's fingerprint the coordinator printed: how the worker trusts it.
    fingerprint = "sha256:" + "ab" * 32
    assert environment(spec(), "worker", fingerprint) == {
        "ARCHIPELAGO_TOKEN": TOKEN,
        "ARCHIPELAGO_CA_FINGERPRINT": fingerprint,
    }
    assert "ARCHIPELAGO_CA_FINGERPRINT" not in environment(spec(), "coordinator", fingerprint)
    assert "--gflops" not in worker_command(spec(), 0)


def test_redis_listens_on_the_network_without_persistence() -> None:
    command = redis_command()
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--bind"] == "0.0.0.0" and flags["--port"] == "6379"
    assert flags["--save"] == "" and flags["--appendonly"] == "no"


# -- the compose file -------------------------------------------------------------------


def test_compose_starts_the_same_services_the_same_way() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "coordinator", "worker"}
    # By service name instead of container name, the commands are cluster up's.
    redis_host = container_name("main", "redis")
    expected = [a.replace(redis_host, "redis") for a in coordinator_command(spec())]
    assert services["coordinator"]["command"] == expected
    assert services["redis"]["command"] == redis_command()
    worker = services["worker"]["command"]
    assert worker[:2] == ["sh", "-c"]
    assert "--coordinator coordinator:7070" in worker[2] and "--listen 0.0.0.0:7071" in worker[2]
    for service in services.values():
        assert service["image"].endswith("archipelago:local}")
        assert service["networks"] == ["cluster"]
    # Published on the host's loopback only.
    assert all(p.startswith("127.0.0.1:") for p in services["coordinator"]["ports"])
    assert "ports" not in services["worker"] and "ports" not in services["redis"]
    assert "ARCHIPELAGO_TOKEN" in services["coordinator"]["environment"]
    assert "ARCHIPELAGO_OPERATOR_TOKEN" in services["coordinator"]["environment"]
    # A worker holds the join token and the authority's fingerprint: no operator secret.
    assert set(services["worker"]["environment"]) == {
        "ARCHIPELAGO_TOKEN",
        "ARCHIPELAGO_CA_FINGERPRINT",
    }


def test_no_engine_is_one_line_naming_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"unix://{tmp_path}/docker.sock"
    assert main(["cluster", "status", "--engine", url]) == 2
    error = capsys.readouterr().err
    assert error == f"archipelago: error: no Docker engine at {url}: start dockerd\n"
