"""Reports of refused values, weighed: whom the coordinator quarantines, and why.

A stage that refuses a received value (not finite, far out of its edge's bounds, an outlier
of its sync group: `worker.value_guard`) names the sender in a report (`Progress.suspects`)
with the evidence. The coordinator cannot check that evidence: the value is gone, and a
peer's values carry no signature. So it weighs who says it:

- It hears a report only from a worker of the job's current plan, about a worker the plan
  has sending it values: another stage of its own replica (activations, gradients), or its
  own stage in another replica (shares of an average). Anyone else's word is dropped.
- Each accusation weighs 1 / (the number of distinct workers its accuser ever named). A
  worker is quarantined for good (`Exclusions.exclude(..., until=None)`) once the weights
  of its distinct accusers reach 1: one accuser naming its first culprit, two naming their
  second, or two replicas that both found the same outlier. Short of that, it is excluded
  for a back-off time (`Exclusions.back_off`), long enough for the job to go on without it.
- An accuser that has named `ACCUSER_LIMIT` (3) distinct workers is quarantined itself: it
  is the common factor of all those refusals.

A spot check's mismatch (`coordinator.spot_checks`: the coordinator recomputed a stage's
micro-batch and it differs from what the next stage says it received) is heard the same
way, as the receiver's accusation of the sender (kind `spot-check`): the receiver's word
about what it received is what the coordinator compared with.

A worker's own values are weighed without an accuser: a checkpoint part that is not
finite quarantines its uploader (`own_values`); a reported loss that is not finite, or far
above the job's recent ones (`loss_problem`), backs its reporter off (an honest job can
diverge too; one that does stops after `MAX_FRUITLESS_RECOVERIES` re-plans).

Either way the plan is broken (a value was refused, so a stage waits for it): the job is
planned again without the excluded workers, from its last validated checkpoint
(`coordinator.checkpoints`). Each verdict is an event of the job with its evidence, and the
job's error says it.

A quarantine holds in every job: the worker is left out of all planning. What this costs a
liar: a hostile worker can get one honest neighbour quarantined (its first accusation), a
second and a third backed off (weights 1/2 and 1/3), and is quarantined itself with the
third; it has to be placed next to each victim by the planner first, and a new identity
has to register again (rate-limited, capped). What it costs an honest worker: one that
meets three hostile neighbours in turn is quarantined with the third, and the second and
third of them are only backed off unless someone else names them too. Accusations are kept
in the store, so a restarted coordinator weighs them the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

from coordinator.events import EventKind, EventLog
from coordinator.job_record import Job, Progress, Suspect
from coordinator.registry import Registry
from coordinator.store import StateStore, StoreError

log = logging.getLogger("archipelago.coordinator")

# Distinct workers one accuser may name before it is taken for the culprit itself.
ACCUSER_LIMIT = 3
# Where the accusations are kept (a blob: the store has no table for them).
ACCUSATIONS_KEY = "quarantine/accusations"
# Accusers (and accused) remembered at most, the oldest forgotten first: the blob stays small.
MAX_ACCUSERS = 10_000
# A reported loss is believed when finite, below the ceiling, and (after the warm-up) not
# above LOSS_JUMP times the median of the job's last LOSS_WINDOW believed losses (or of its
# first LOSS_WARMUP ones, when larger).
LOSS_CEILING = 1e12
LOSS_JUMP = 100.0
LOSS_WARMUP = 5
LOSS_WINDOW = 32


@dataclass(frozen=True)
class Verdict:
    """What one heard accusation led to."""

    accuser_id: str
    accused_id: str
    accused_name: str
    weight: float  # this accusation's weight
    score: float  # the accused's accusers' weights together
    quarantined: bool  # for good (else backed off)
    text: str  # one line for the job's error and events


class Quarantine:
    """Accusations heard, and the exclusions they led to (through `registry.exclusions`)."""

    def __init__(self, store: StateStore, registry: Registry, events: EventLog) -> None:
        self.store = store
        self.registry = registry
        self.events = events
        self._named: dict[str, list[str]] = {}  # accuser -> distinct workers it named
        self._against: dict[str, dict[str, float]] = {}  # accused -> accuser -> weight
        self._loaded = False
        self._losses: dict[str, deque[float]] = {}  # job id -> its recent believed losses
        self._first_losses: dict[str, list[float]] = {}  # job id -> its first believed ones

    async def load(self) -> None:
        """Read the stored accusations (at coordinator start; else at the first report)."""
        if self._loaded:
            return
        self._loaded = True
        try:
            raw = await asyncio.to_thread(self.store.get_blob, ACCUSATIONS_KEY)
            held = json.loads(raw) if raw else {}
            named, against = held.get("named", {}), held.get("against", {})
            self._named = {str(k): [str(w) for w in v] for k, v in named.items()}
            self._against = {
                str(k): {str(a): float(w) for a, w in v.items()} for k, v in against.items()
            }
        except (StoreError, ValueError, TypeError, AttributeError) as e:
            log.warning("stored accusations unreadable, starting afresh: %s", e)

    async def _save(self) -> None:
        for held in (self._named, self._against):  # the oldest first (insertion order)
            while len(held) > MAX_ACCUSERS:
                held.pop(next(iter(held)))
        blob = json.dumps({"named": self._named, "against": self._against}).encode()
        try:
            await asyncio.to_thread(self.store.put_blob, ACCUSATIONS_KEY, blob)
        except (StoreError, ValueError) as e:
            log.warning("accusations not stored: %s", e)

    def accused_of(self, job: Job, accuser_id: str, s: Suspect) -> tuple[str, str] | None:
        """(worker id, name) of the worker `s` blames, if the job's plan has it send values
        to `accuser_id`; else None (the report is not heard)."""
        plan = job.plan
        if plan is None:
            return None
        mine = [p for p in plan.placements if p.worker_id == accuser_id]
        if len(mine) != 1:
            return None
        me = mine[0]
        if s.kind == "share":
            related = s.stage == me.stage and s.replica != me.replica
        else:
            # A spot check's mismatch is heard as the receiver's word about its sender.
            related = s.kind in ("activation", "gradient", "spot-check") and (
                s.replica == me.replica and s.stage != me.stage
            )
        if not related:
            return None
        for p in plan.placements:
            if p.stage == s.stage and p.replica == s.replica and p.worker_id != accuser_id:
                return p.worker_id, p.worker_name
        return None

    async def hear(self, job: Job, p: Progress) -> list[Verdict]:
        """Weigh the suspects of report `p` and exclude whom they blame; returns a verdict
        per accusation heard (none: the report is not one the job's plan explains)."""
        await self.load()
        accuser_name = next(
            (
                x.worker_name
                for x in (job.plan.placements if job.plan else ())
                if x.worker_id == p.worker_id
            ),
            p.worker_id,
        )
        verdicts: list[Verdict] = []
        for s in p.suspects:
            found = self.accused_of(job, p.worker_id, s)
            if found is None:
                log.warning(
                    "job %s: a report from %s blames stage %d of replica %d, which sends it "
                    "nothing; not heard",
                    job.job_id,
                    accuser_name,
                    s.stage,
                    s.replica,
                )
                continue
            verdicts.append(await self._weigh(job, p.worker_id, accuser_name, *found, s))
        if verdicts:
            await self._save()
        return verdicts

    async def _weigh(
        self,
        job: Job,
        accuser_id: str,
        accuser_name: str,
        accused_id: str,
        accused_name: str,
        s: Suspect,
    ) -> Verdict:
        named = self._named.setdefault(accuser_id, [])
        if accused_id not in named:
            named.append(accused_id)
        weight = 1.0 / len(named)
        against = self._against.setdefault(accused_id, {})
        against[accuser_id] = max(against.get(accuser_id, 0.0), weight)
        score = sum(against.values())
        quarantined = score >= 1.0 - 1e-9
        evidence = f"{s.evidence} (reported by {accuser_name})"
        exclusions = self.registry.exclusions
        if quarantined:
            text = f"quarantined worker {accused_name}: {evidence}"
        else:
            text = (
                f"excluded worker {accused_name} for a while: {evidence}; its accusers' "
                f"weight {score:.2f} is short of a quarantine"
            )
        # Before anything is awaited: the refused sender's own failure may be re-planning
        # the job meanwhile, and the re-plan must give this reason (`JobLifecycle`).
        job.blame = f"{job.blame}; {text}" if job.blame else text
        if exclusions is not None and quarantined:
            await exclusions.exclude(accused_id, accused_name, reason=evidence, until=None)
        elif exclusions is not None:
            await exclusions.back_off(accused_id, accused_name, reason=evidence)
        fields: dict[str, str | int | float | bool] = dict(
            epoch=job.epoch,
            step=s.step,
            worker_id=accused_id,
            worker_name=accused_name,
            accuser_id=accuser_id,
            accuser_name=accuser_name,
            value=s.kind,
            evidence=s.evidence,
            weight=weight,
            score=score,
        )
        if s.norm == s.norm:  # NaN: no norm (a non-finite value)
            fields.update(norm=s.norm, bound=s.bound)
        await self.events.record(
            job.job_id,
            EventKind.QUARANTINED if quarantined else EventKind.SUSPECTED,
            text,
            **fields,
        )
        log.warning("job %s: %s", job.job_id, text)
        if len(named) >= ACCUSER_LIMIT:
            reason = (
                f"named {len(named)} different workers as senders of bad values: the common "
                "factor of those refusals"
            )
            log.warning("job %s: worker %s %s", job.job_id, accuser_name, reason)
            if exclusions is not None:
                await exclusions.exclude(accuser_id, accuser_name, reason=reason, until=None)
            await self.events.record(
                job.job_id,
                EventKind.QUARANTINED,
                f"quarantined worker {accuser_name}: {reason}",
                epoch=job.epoch,
                worker_id=accuser_id,
                worker_name=accuser_name,
                evidence=reason,
            )
        return Verdict(accuser_id, accused_id, accused_name, weight, score, quarantined, text)

    # -- a worker's own values ----------------------------------------------------------------

    async def own_values(
        self,
        job: Job,
        worker_id: str,
        evidence: str,
        *,
        for_good: bool,
        kind: EventKind = EventKind.BAD_LOSS,
    ) -> str:
        """A worker's own values are bad (its checkpoint: `for_good`; its reported loss, or
        spot checks' evidence it withheld, `kind`: a back-off, as an honest run can diverge
        too): exclude it; returns the job's line."""
        name = next(
            (
                p.worker_name
                for p in (job.plan.placements if job.plan else ())
                if p.worker_id == worker_id
            ),
            worker_id,
        )
        exclusions = self.registry.exclusions
        if for_good:
            text = f"quarantined worker {name}: {evidence}"
            if exclusions is not None:
                await exclusions.exclude(worker_id, name, reason=evidence, until=None)
        else:
            text = f"excluded worker {name} for a while: {evidence}"
            if exclusions is not None:
                await exclusions.back_off(worker_id, name, reason=evidence)
        await self.events.record(
            job.job_id,
            EventKind.QUARANTINED if for_good else kind,
            text,
            epoch=job.epoch,
            worker_id=worker_id,
            worker_name=name,
            evidence=evidence,
        )
        log.warning("job %s: %s", job.job_id, text)
        return text

    def loss_problem(self, job: Job, p: Progress) -> str:
        """Why the loss `p` reports is not believed ("" when it is): not finite, beyond
        `LOSS_CEILING`, or, once the job reported `LOSS_WARMUP` losses, above `LOSS_JUMP`
        times the larger of the median of its recent ones and that of its first ones (a
        loss that trained down near zero may still move by more than 100x, never past its
        start). A believed loss joins the recent ones."""
        loss = p.loss
        if loss is None:
            return ""
        recent = self._losses.setdefault(job.job_id, deque(maxlen=LOSS_WINDOW))
        first = self._first_losses.setdefault(job.job_id, [])
        what = (
            f"stage {p.stage} of replica {p.replica} reported a loss of {loss:.4g} at step {p.step}"
        )
        if not math.isfinite(loss) or abs(loss) >= LOSS_CEILING:
            return what
        if len(first) >= LOSS_WARMUP:
            typical = max(abs(statistics.median(recent)), abs(statistics.median(first)), 1e-12)
            if abs(loss) > LOSS_JUMP * typical:
                return f"{what}, over {LOSS_JUMP:g} x its typical {typical:.4g}"
        recent.append(loss)
        if len(first) < LOSS_WARMUP:
            first.append(loss)
        return ""
