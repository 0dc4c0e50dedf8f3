"""The tree's layering, read from its own imports: each package may import only the layers
below it, generated protobuf classes stay behind the serde modules, modules stay small and
servicers thin. A forbidden import added anywhere fails here, naming the file and line.

The layers, bottom up (see the README's "What is where"):

- `proto`: the wire (schemas, generated code, gRPC conventions, tensor streaming, the
  dtype table); nothing of ours.
- `compressors`: pure tensor code; only the wire's dtype table.
- `opdag`: the graph, its costs, partitioning and remote autodiff; the wire (its file
  format is a protobuf message), never the network.
- `coordinator.planning`: job specs to plans; `opdag`, `compressors` and the dtype table.
- `coordinator` and `worker`: the two services; the layers above, never each other.
- `deploy`: the WAN testbed; stands alone.
- `archipelago`: the command, the user's client, the demo; nothing below imports it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OURS = ("proto", "compressors", "opdag", "coordinator", "worker", "deploy", "archipelago")
PRODUCT = OURS  # what ships; bench/ is scanned for generated classes too

# package (longest prefix wins) -> the packages of ours it may import, besides itself.
ALLOWED: dict[str, tuple[str, ...]] = {
    "proto": (),
    "compressors": ("proto.dtypes",),
    "opdag": ("proto",),
    "coordinator.planning": ("opdag", "compressors", "proto.dtypes"),
    "coordinator": ("opdag", "compressors", "proto"),
    "worker": ("opdag", "compressors", "proto"),
    "deploy": (),
    "archipelago": OURS,
}
# Only these may touch generated protobuf modules (`*_pb2`, `*_pb2_grpc`).
SERDE_MODULES = (
    "opdag.graph_serde",
    "coordinator.serde",
    "coordinator.history_serde",
    "coordinator.inquiry_serde",
    "coordinator.model_serde",
    "worker.serde",
    "worker.coordinator_serde",
    "archipelago.serde",
    "archipelago.model_serde",
    # users' own data (issue 11)
    "coordinator.dataset_serde",
    "worker.dataset_serde",
    "archipelago.dataset_serde",
)
# Plain tables may be long; code may not.
LONG_TABLES = ("opdag.ops",)
MAX_MODULE_LINES = 500
MAX_SERVICER_METHOD_LINES = 30
SERVICERS = ("coordinator/service.py", "worker/service.py")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, source: str, *, is_package: bool = False) -> list[Import]:
    """Every import of one of our packages in `source`, at any depth (functions and
    TYPE_CHECKING blocks included: a dependency is a dependency)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for t in targets:
            if t.split(".")[0] in OURS:
                found.append(Import(module, t, node.lineno))
    return found


def layer_of(module: str) -> str | None:
    best = None
    for layer in ALLOWED:
        if (module == layer or module.startswith(layer + ".")) and (
            best is None or len(layer) > len(best)
        ):
            best = layer
    return best


def within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def forbidden(imp: Import) -> str | None:
    """Why `imp` breaks the layering, or None when it is allowed."""
    layer = layer_of(imp.module)
    if layer is None:
        return None
    if imp.module not in ("archipelago.cli", "archipelago.__main__") and within(
        imp.target, "archipelago.cli"
    ):
        return f"{imp.module} imports the command line ({imp.target})"
    if within(imp.target, layer):
        return None
    if re.search(r"_pb2(_grpc)?$", imp.target.split(".")[-1]) and not (
        imp.module in SERDE_MODULES or layer == "proto"
    ):
        return f"{imp.module} imports generated {imp.target}: only serde modules may"
    if any(within(imp.target, ok) for ok in ALLOWED[layer]):
        return None
    return f"{imp.module} ({layer}) may not import {imp.target}"


def product_files(packages: tuple[str, ...] = PRODUCT) -> list[Path]:
    return sorted(
        p
        for pkg in packages
        for p in (ROOT / pkg).rglob("*.py")
        if not re.search(r"_pb2(_grpc)?\.py$", p.name)
    )


def all_imports() -> list[Import]:
    out = []
    for path in product_files():
        out += imports_of(
            module_name(path), path.read_text(), is_package=path.name == "__init__.py"
        )
    return out


# -- the rules, checked on the tree -----------------------------------------------------------


def test_every_import_points_down_the_layers() -> None:
    # One line per offending import statement (a `from a import b` is checked as a and a.b).
    by_line: dict[tuple[str, int], str] = {}
    for imp in all_imports():
        if (why := forbidden(imp)) is not None:
            by_line.setdefault((imp.module, imp.line), f"{imp.module}:{imp.line}: {why}")
    problems = list(by_line.values())
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_generated_protobuf_classes_appear_only_in_serde_modules_and_proto() -> None:
    outside = []
    for path in product_files((*PRODUCT, "bench")):
        mod = module_name(path)
        if mod in SERDE_MODULES or layer_of(mod) == "proto":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "_pb2" in line:
                outside.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not outside, "generated classes outside the serde modules:\n" + "\n".join(outside)


def test_no_dataclass_holds_a_generated_protobuf_type() -> None:
    # Plain data crosses module boundaries; messages stay inside the serde functions.
    holding = []
    for path in product_files():
        for cls in ast.walk(ast.parse(path.read_text())):
            if isinstance(cls, ast.ClassDef) and any(
                "dataclass" in ast.unparse(d) for d in cls.decorator_list
            ):
                holding += [
                    f"{path.relative_to(ROOT)}: {cls.name}.{ast.unparse(f.target)}"
                    for f in cls.body
                    if isinstance(f, ast.AnnAssign) and "_pb2" in ast.unparse(f.annotation)
                ]
    assert not holding, "dataclasses holding protobuf messages:\n" + "\n".join(holding)


def test_no_module_is_longer_than_a_few_hundred_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in product_files()
        if module_name(path) not in LONG_TABLES
        and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def servicer_methods(source: str) -> list[tuple[str, int]]:
    """(Class.method, lines) of every method of every class in a servicer module."""
    out = []
    for cls in ast.parse(source).body:
        if isinstance(cls, ast.ClassDef):
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    end = fn.end_lineno or fn.lineno
                    out.append((f"{cls.name}.{fn.name}", end - fn.lineno + 1))
    return out


@pytest.mark.parametrize("path", SERVICERS)
def test_servicer_methods_only_decode_call_and_encode(path: str) -> None:
    source = (ROOT / path).read_text()
    long = [
        f"{name}: {n} lines"
        for name, n in servicer_methods(source)
        if n > MAX_SERVICER_METHOD_LINES
    ]
    assert not long, f"{path}: methods over {MAX_SERVICER_METHOD_LINES} lines:\n" + "\n".join(long)
    # A servicer calls public methods of the objects it holds, never their internals.
    private = re.findall(r"self\.\w+\.(_[a-z]\w*)\(", source)
    assert not private, f"{path} calls private methods of other objects: {sorted(set(private))}"


# -- the checker itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "source", "why"),
    [
        ("opdag.partition", "from coordinator.jobs import JobManager", "may not import"),
        ("compressors.topk", "import opdag.errors", "may not import"),
        ("proto.rpc", "from opdag.values import Value", "may not import"),
        ("coordinator.planning.opfence", "from coordinator.store import open_store", "may not"),
        ("coordinator.jobs", "from worker.node import WorkerNode", "may not import"),
        ("worker.node", "from coordinator import registry", "may not import"),
        ("worker.peers", "from proto import worker_pb2", "only serde modules may"),
        ("archipelago.client", "from archipelago.cli import main", "the command line"),
        ("deploy.wan.errors", "from archipelago.errors import UsageError", "may not import"),
        ("worker.peers", "def f():\n    from coordinator.jobs import Job\n", "may not import"),
    ],
)
def test_checker_refuses_a_forbidden_import(module: str, source: str, why: str) -> None:
    problems = [w for imp in imports_of(module, source) if (w := forbidden(imp))]
    assert problems and why in problems[0], problems


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("coordinator.jobs", "from coordinator.planning.plan import Plan"),
        ("coordinator.planning.plan", "from opdag.partition import Partition"),
        ("worker.serde", "from proto import worker_pb2"),
        ("compressors.payload", "from proto.dtypes import DTYPES"),
        ("archipelago.demo", "from coordinator.main import serve"),
        ("worker.stage_job", "from opdag.schedule import one_f_one_b"),
    ],
)
def test_checker_allows_an_import_down_the_layers(module: str, source: str) -> None:
    assert [w for imp in imports_of(module, source) if (w := forbidden(imp))] == []
