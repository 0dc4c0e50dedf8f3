"""The service subcommands: `coordinator`, `worker`, `submit`, `status`, `watch`, `cancel`,
`metrics`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from archipelago.client import ClientError, CoordinatorClient, JobView, LinkView
from archipelago.coordinator_flags import add_exclusion_flags, with_exclusion_flags
from archipelago.credential_args import (
    add_join_token_arg,
    add_operator_arg,
    add_operator_token_args,
    join_token,
    operator_token,
)
from archipelago.datacmd import add_data_cache_arg, add_data_commands
from archipelago.errors import UsageError
from archipelago.exportcmd import add_export_command
from archipelago.job_lines import eta, format_stage_times, job_line, replica_lines
from archipelago.relay_flags import (  # -- relay
    add_coordinator_relay_flags,
    add_worker_relay_flags,
    relay_config_from_flags,
    worker_relay_fields,
)
from archipelago.tls_args import (
    add_client_tls_args,
    add_coordinator_tls_args,
    client_tls,
    worker_trust,
)
from coordinator.limits import add_coordinator_limit_flags, coordinator_limits_from_flags
from opdag.report import human_bytes, human_count
from proto.certificates import CertificateError
from proto.concurrency import WORKER_RPC_LIMITS, add_rpc_limit_flags, rpc_limits_from_flags

DEFAULT_COORDINATOR = "127.0.0.1:7070"


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator")
    p.add_argument("--port", type=int, default=7070, help="port to serve on (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    add_join_token_arg(p, required=True)
    add_operator_token_args(p)
    p.add_argument(
        "--store",
        default=None,
        help="state store URL: sqlite:///PATH (default "
        "~/.archipelago/coordinator.db) or redis://HOST:PORT/DB",
    )
    add_coordinator_tls_args(p)
    p.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="a worker silent this long is lost and its job re-planned",
    )
    add_exclusion_flags(p)
    p.add_argument(
        "--worker-networks",
        default="",
        metavar="CIDR[,CIDR]",
        help="accept only workers whose address lies in these networks (default: any but "
        "link-local, multicast and reserved, and loopback only if the coordinator serves it)",
    )
    p.add_argument(
        "--link-probes",
        type=int,
        default=2,
        metavar="N",
        help="links measured at once between idle workers (0: never measure)",
    )
    p.add_argument(
        "--dashboard",
        default=None,
        metavar="HOST:PORT",
        help="serve the web dashboard here (default 127.0.0.1:7080, given up with a warning "
        "if taken; off: no dashboard)",
    )
    p.add_argument(
        "--dashboard-token",
        default=os.environ.get("ARCHIPELAGO_DASHBOARD_TOKEN", ""),
        help="a read-only token that opens the dashboard and nothing else (default: "
        "$ARCHIPELAGO_DASHBOARD_TOKEN; the operator token opens it too)",
    )
    add_coordinator_limit_flags(p)
    add_coordinator_relay_flags(p)
    _log_arg(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="join a coordinator as a volunteer worker")
    _coordinator_arg(p)
    add_join_token_arg(p, required=True)
    p.add_argument("--name", default="", help="a name to show (default: host name)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT this worker serves on")
    p.add_argument(
        "--advertise", default="", help="HOST:PORT others reach it at (default: --listen)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument(
        "--gflops",
        type=float,
        default=0.0,
        help="declare this worker's speed in GFLOP/s instead of measuring it at start "
        "(0: measure); the coordinator refits it from the steps the worker runs",
    )
    p.add_argument(
        "--probe-networks",
        default="",
        metavar="CIDR[,CIDR]",
        help="only measure links to workers inside these networks (default: any but "
        "link-local, multicast and reserved, and loopback only if this worker serves it)",
    )
    add_data_cache_arg(p)  # users' own data
    add_rpc_limit_flags(p, WORKER_RPC_LIMITS)
    add_worker_relay_flags(p)
    add_client_tls_args(p)
    _log_arg(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("submit", help="submit a job spec (YAML); prints the job id")
    p.add_argument("spec", help="the job spec file")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.add_argument("--watch", action="store_true", help="then follow it like `watch`")
    p.set_defaults(func=cmd_submit)

    add_export_command(sub)  # users' own models: the trained model back (archipelago.exportcmd)

    add_data_commands(sub)  # users' own data: `archipelago data put` (archipelago.datacmd)

    p = sub.add_parser("status", help="jobs and workers (or one job, with its plan)")
    p.add_argument("job", nargs="?", help="a job id")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--links", action="store_true", help="the measured bandwidth between workers")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plan", help="a job's plan: islands, stages, placement, cut links")
    plan_sub = p.add_subparsers(dest="plan_command", required=True, metavar="ACTION")
    p = plan_sub.add_parser("show", help="explain a job's current plan")
    p.add_argument("job")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan_show)

    p = sub.add_parser("watch", help="follow a job: step, loss, samples/s, ETA")
    p.add_argument("job")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("events", help="a job's timeline, or the cluster's (joins, losses)")
    p.add_argument("job", nargs="?", default="", help="a job id (none: the cluster's events)")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("metrics", help="export a job's step metrics as CSV or for TensorBoard")
    p.add_argument("job")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--csv", type=Path, metavar="FILE", help="one row per metric record")
    to.add_argument("--tensorboard", type=Path, metavar="DIR", help="a TensorBoard run")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.set_defaults(func=cmd_metrics)


def _coordinator_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        default=os.environ.get("ARCHIPELAGO_COORDINATOR", DEFAULT_COORDINATOR),
        metavar="HOST:PORT",
        help=f"the coordinator (default: $ARCHIPELAGO_COORDINATOR or {DEFAULT_COORDINATOR})",
    )


def _log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return CoordinatorClient(
        args.coordinator, operator_token=operator_token(args), tls=client_tls(args)
    )


# -- daemons -----------------------------------------------------------------------------


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.dashboard.server import DEFAULT_ADDRESS, parse_address
    from coordinator.link_survey import ProbeConfig
    from coordinator.main import DEFAULT_STORE, CoordinatorConfig, serve

    _logging(args)
    dashboard = DEFAULT_ADDRESS if args.dashboard is None else args.dashboard
    if dashboard == "off":
        dashboard = ""
    try:
        if dashboard:
            parse_address(dashboard)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.dashboard_token and len(args.dashboard_token) < 8:
        raise UsageError("the dashboard token must be at least 8 characters")
    cfg = CoordinatorConfig(
        token=join_token(args),
        port=args.port,
        host=args.host,
        store=args.store or DEFAULT_STORE,
        insecure=args.insecure,
        ca_file=args.ca_file,
        heartbeat_s=args.heartbeat_interval,
        worker_timeout_s=args.worker_timeout,
        worker_networks=tuple(n for n in args.worker_networks.split(",") if n.strip()),
        probes=ProbeConfig(concurrency=args.link_probes),
        dashboard=dashboard,
        dashboard_required=args.dashboard is not None,
        dashboard_token=args.dashboard_token,
        operator_token=args.operator_token,
        operator_token_file=args.operator_token_file,
        limits=coordinator_limits_from_flags(args),
        relay=relay_config_from_flags(args),
    )
    if cfg.worker_timeout_s <= cfg.heartbeat_s:
        raise UsageError("--worker-timeout must be longer than --heartbeat-interval")
    cfg = with_exclusion_flags(cfg, args)
    try:
        return asyncio.run(serve(cfg))
    except (OSError, CertificateError, ValueError) as e:
        raise UsageError(str(e)) from None


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.coordinator_link import RefusedError
    from worker.main import WorkerConfig, serve

    _logging(args)
    fingerprint, ca_file, insecure = worker_trust(args)
    cfg = WorkerConfig(
        coordinator=args.coordinator,
        token=join_token(args),
        name=args.name,
        listen=args.listen,
        advertise=args.advertise,
        ca_fingerprint=fingerprint,
        ca_file=ca_file,
        insecure=insecure,
        threads=args.threads,
        gflops=args.gflops,
        device=args.device,
        probe_networks=tuple(n for n in args.probe_networks.split(",") if n.strip()),
        rpc_limits=rpc_limits_from_flags(args),
        data_cache=args.data_cache,
        **worker_relay_fields(args),
    )
    try:
        return asyncio.run(serve(cfg))
    except (RefusedError, OSError, CertificateError, ValueError) as e:
        raise UsageError(str(e)) from None


# -- users -------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from coordinator.planning.jobspec import load_job_spec

    spec = load_job_spec(args.spec)  # refuse a bad spec here, before the network
    text = Path(args.spec).read_text()
    client = _client(args)
    upload = None
    if spec.model.uploaded:  # the user's own model: captured here, uploaded with the job
        from archipelago.exportcmd import prepare_upload

        upload = prepare_upload(spec, Path(args.spec), client)
    try:
        job = client.submit_model(text, *upload) if upload else client.submit(text)
    except ClientError as e:
        raise UsageError(str(e)) from None
    print(job.job_id)
    if args.watch:
        return _follow(client, job.job_id)
    return 0


def format_links(links: list[LinkView]) -> str:
    """The measured links as a table, one row a directed pair."""
    if not links:
        return "no links measured yet (workers are measured while idle, a pair at a time)"
    rows = [f"{'from':<20} {'to':<20} {'Mbit/s':>10} {'rtt ms':>8} {'age':>8}"]
    for link in sorted(links, key=lambda x: (x.src_name, x.dst_name)):
        rows.append(
            f"{link.src_name:<20} {link.dst_name:<20} {link.bandwidth * 8e-6:>10.1f} "
            f"{link.rtt_s * 1e3:>8.2f} {eta(link.age_s):>8}"
        )
    return "\n".join(rows)


def cmd_plan_show(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        plan = client.plan(args.job)
    except ClientError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(asdict(plan), indent=2))
        return 0
    print(f"job {plan.job_id}, plan epoch {plan.epoch} (planner {plan.planner})")
    print(plan.text.rstrip() or "  (no explanation recorded for this plan)")
    measured = f"{plan.measured_step_s:.3f} s" if plan.measured_step_s else "not yet"
    line = f"step time: predicted {plan.predicted_step_s:.3f} s, measured {measured}"
    if plan.calibrated_step_s:
        line += f"; re-predicted with measured compute {plan.calibrated_step_s:.3f} s"
    print(line)
    if plan.stages:
        print(format_stage_times(plan.stages))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if args.links:
            links = client.links()
            if args.json:
                print(json.dumps([asdict(x) for x in links], indent=2))
            else:
                print(format_links(links))
            return 0
        if args.job:
            job = client.job(args.job, with_metrics=True)
            if args.json:
                print(json.dumps(asdict(job), indent=2))
                return 0
            print(job_line(job))
            print(
                f"  plan epoch {job.epoch} ({job.recoveries} re-plans), last checkpoint at step "
                f"{job.last_checkpoint}, {human_bytes(job.bytes_per_step)} between stages per step"
            )
            if job.error:
                print(f"  last error: {job.error}")
            replicas = len({s.replica for s in job.stages})
            for s in job.stages:
                where = f"replica {s.replica} " if replicas > 1 else ""
                print(
                    f"  stage {s.stage}: {where}{s.worker_name} ({s.address})  {s.nodes} "
                    f"operators, {human_count(s.params)} parameters"
                )
            for line in replica_lines(job):
                print(f"  {line}")
            return 0
        jobs, workers = client.jobs(), client.workers()
    except ClientError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(
            json.dumps(
                {"jobs": [asdict(j) for j in jobs], "workers": [asdict(w) for w in workers]},
                indent=2,
            )
        )
        return 0
    print(f"jobs ({len(jobs)}):")
    for j in jobs:
        print(f"  {job_line(j)}")
    print(f"workers ({len(workers)}):")
    for w in workers:
        on_job = f" job {w.job_id}" if w.job_id else ""
        # The speed planned with; a claim the planner does not believe is shown beside it.
        claim = f" (claims {w.gflops:.1f})" if abs(w.planned_gflops - w.gflops) > 0.05 else ""
        print(
            f"  {w.worker_id}  {w.name:<20} {w.address:<22} {w.state:<6} "
            f"{w.planned_gflops:6.1f} GFLOP/s{claim} {human_bytes(w.memory_bytes):>9}{on_job}"
        )
        if w.relayed:  # -- relay
            print("      behind NAT: reached through the coordinator's relay at its address")
        if not w.reachable and not w.excluded and w.state == "idle":
            print("      not planned yet: the coordinator has not reached its address")
        if w.excluded:
            until = f"for {w.excluded_for_s:.0f} s more" if w.excluded_for_s else "quarantined"
            print(f"      excluded from planning ({until}): {w.excluded}")
    return 0


def _follow(client: CoordinatorClient, job_id: str) -> int:
    bar: tqdm | None = None
    lines: list[tqdm] = []  # a status line under the bar per replica and sync group
    last: JobView | None = None
    try:
        for job in client.watch(job_id):
            last = job
            if bar is None:
                bar = tqdm(total=job.steps, desc=f"{job.name} ({job.job_id})", unit="step")
            bar.n = job.steps_done
            loss = f"{job.loss:.4f}" if job.loss is not None else "-"
            bar.set_postfix_str(
                f"{job.state}, loss {loss}, {job.samples_per_s:.1f} samples/s, epoch {job.epoch}"
                + (f", {job.replicas} replicas" if job.replicas > 1 else ""),
                refresh=True,
            )
            if job.replicas > 1:  # each change carries the replicas' recent figures
                texts = replica_lines(job)
                while len(lines) < len(texts):
                    lines.append(tqdm(position=len(lines) + 1, bar_format="{desc}", leave=False))
                for i, line in enumerate(lines):
                    line.set_description_str(f"  {texts[i]}" if i < len(texts) else "", True)
        final = replica_lines(last) if last is not None and last.replicas > 1 else []
    except ClientError as e:
        raise UsageError(str(e)) from None
    finally:
        for line in lines:
            line.close()
        if bar is not None:
            bar.close()
    if last is None:
        return 1
    print(
        f"job {last.job_id} {last.state}"
        + (f": {last.error}" if last.error and last.state != "completed" else "")
    )
    for text in final:
        print(f"  {text}")
    return 0 if last.state == "completed" else 1


def cmd_watch(args: argparse.Namespace) -> int:
    return _follow(_client(args), args.job)


def cmd_metrics(args: argparse.Namespace) -> int:
    from archipelago.metrics_export import export_job

    print(export_job(_client(args), args.job, csv_path=args.csv, tensorboard_dir=args.tensorboard))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from archipelago.event_lines import print_events

    try:
        return print_events(_client(args), args.job, follow=args.follow)
    except ClientError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        return 130


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        job = _client(args).cancel(args.job)
    except ClientError as e:
        raise UsageError(str(e)) from None
    print(f"job {job.job_id} {job.state}")
    return 0
