"""The OP-DAG subcommands: `capture`, `dag` and `partition`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from archipelago.errors import UsageError
from opdag import model_file, report
from opdag.capture import capture
from opdag.partition import balanced_assignment, partition
from opdag.zoo import build_model, example_batch


def parse_assignments(items: Sequence[str] | None) -> dict[str, Any]:
    """`key=value` pairs, each value read as YAML (`12`, `0.1`, `[16, 32]`, `true`)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--arg {item!r} is not of the form NAME=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UsageError(f"--arg {item!r}: cannot read the value: {e}") from None
    return out


def cmd_capture(args: argparse.Namespace) -> int:
    model_args = parse_assignments(args.arg)
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, not {args.batch}")
    model = build_model(args.model, model_args, seed=args.seed)
    example = example_batch(args.model, model_args, args.batch, device="meta")
    captured = capture(model, example, name=args.model)
    out = Path(args.out)
    if not out.parent.exists():
        raise UsageError(f"directory {out.parent} does not exist")
    model_file.save(captured, out)
    g = captured.graph
    print(
        f"captured {args.model}: {len(g.nodes)} nodes, {report.human_count(g.num_params())} "
        f"parameters, {report.human_bytes(out.stat().st_size)} -> {out}"
    )
    return 0


def cmd_dag(args: argparse.Namespace) -> int:
    model = model_file.load(args.file)
    summary = report.dag_summary(model.graph, top=args.top)
    if args.nodes:
        summary["listing"] = model.graph.describe().splitlines()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(report.format_dag_summary(summary))
        if args.nodes:
            print()
            print(model.graph.describe())
    return 0


def _read_assignment(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid JSON or YAML: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(f"{path} must map node names to stage numbers")
    return data


def cmd_partition(args: argparse.Namespace) -> int:
    model = model_file.load(args.file)
    if args.stages is not None:
        assignment = balanced_assignment(model.graph, args.stages)
    else:
        assignment = _read_assignment(args.assign)
    result = partition(model.graph, assignment)
    summary = report.partition_summary(result)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(report.format_partition_summary(summary))
    return 0
