"""A job planned on named workers, and the stage plan each worker would be handed, without
a network: the coordinator's hand-over turned into the worker's `StagePlan` through both
serde modules, as a real `LoadStage` would."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.checkpoints import Checkpoints
from coordinator.handover import StageHandover
from coordinator.planning.compute import ComputeModel
from coordinator.planning.jobspec import JobSpec
from coordinator.planning.plan import Plan, WorkerSlot, stage_routes
from coordinator.planning.planner import PlanRequest, make_plan
from coordinator.serde import stage_assignment_pb
from opdag.ir import CapturedModel
from worker.serde import StagePlan, stage_plan_from_pb


def planned_stages(
    model: CapturedModel, job: JobSpec, workers: Sequence[WorkerSlot]
) -> tuple[Plan, list[StagePlan]]:
    """The plan of `job` on `workers`, and every placement's stage plan, in placement order."""
    request = PlanRequest("j", 1, 0, model.graph, job, list(workers), {}, ComputeModel())
    plan, cut = make_plan(request)
    routes = stage_routes(cut)
    plans = []
    for p in plan.placements:
        stage = cut.stages[p.stage]
        handover = StageHandover(
            job_id="j",
            epoch=1,
            stage=stage,
            plan=plan,
            routes=routes[stage.index],
            spec=job,
            fingerprint="",
            start_step=0,
            secret="s" * 32,
            tensors=Checkpoints.stage_tensors("j", stage, model.state),
            replica=p.replica,
        )
        plans.append(stage_plan_from_pb(stage_assignment_pb(handover)))
    return plan, plans
