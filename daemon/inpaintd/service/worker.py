"""The worker's half of the daemon: one claim through its states, inside one fault boundary.

`process(claim)` moves a claim as far as it can go:

    publishing -> publication goes on from the claim's stage (store.outbox)  -> published
    claimed    -> read, paint (paint.job.run_job), stage and publish (store.outbox)  -> published
    published  -> archive the inputs (store.records)                       -> done, claim dropped
    failing    -> inputs and error.json into failed/ (store.records)      -> done, claim dropped

Whatever a step raises goes to `_settle`, which asks core.boundary.classify for the verdict:
leave it claimed (shutdown; another device took it), hold it beside the queue (a transient
error: disk full, a folder unwritable) or fail it with a code. Nothing a job raises reaches
the loop that serves the others. What one job's run needs (its deadline, whether its attempt
was counted, its painted result) lives in a JobContext, not on the Service.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from ..core import boundary
from ..core.boundary import Action
from ..core.config import Config
from ..core.errors import Code, Interrupted, JobError, TakenOver, TransientError
from ..core.jobs import JobResult, timestamp
from ..core.quoting import for_display, shorten
from ..intake.grouping import oversize_message
from ..paint.job import run_job
from ..paint.jobspec import build_request, load_job_options
from ..paint.sidecar import claim_fields
from ..store import outbox, pausepoints, records
from ..store.fleet import Fleet
from ..store.pausepoints import PausePoint
from ..store.spool import Claim, ClaimState, Spool
from ..store.status import StatusFile, error_summary
from .queues import Held, HeldJobs

log = structlog.get_logger("inpaintd.service")


@dataclass
class JobContext:
    """One run of one claim through `process`."""

    claim: Claim
    held: Held | None  # the hold it was retried from, if any
    log: Any  # the logger bound to job= and job_id=
    deadline: float | None = None  # monotonic end of limits.max_job_seconds, once painting started
    attempt_counted: bool = False  # begin_attempt ran: undo it if the run ends cleanly
    painted: JobResult | None = None  # kept by a hold when only publication must wait


class Worker:
    """The per-claim state machine; the Service (daemon.py) provides config, spool, held, status,
    engine, fleet, notifier and the loop that calls `process`."""

    config: Config
    spool: Spool
    held: HeldJobs
    status: StatusFile | None
    engine: Any  # engine.Engine, a core.jobs.Painter
    fleet: Fleet | None
    host: str
    device: str
    stopping: threading.Event
    current: JobContext | None

    def _on_step(self, done: int, total: int) -> None:
        """After every denoising step: watchdog, shutdown, the job's time budget, progress."""
        if self.config.service.watchdog_from_steps:
            self._ping()
        if done == 1:
            pausepoints.reached(PausePoint.PAINTING)
        ctx = self.current
        assert ctx is not None and self.status is not None
        claim = ctx.claim
        if self.stopping.is_set():
            raise Interrupted(f"stopping: {claim.name} interrupted at step {done}/{total}")
        if ctx.deadline is not None and time.monotonic() > ctx.deadline:
            budget = self.config.limits.max_job_seconds
            raise JobError(
                "job_too_costly",
                f"painting took longer than limits.max_job_seconds ({budget:g} s); stopped at step {done}/{total}",
                {"max_job_seconds": budget, "step": done, "total": total},
            )
        names = self._queue_names()
        now = time.monotonic()
        if now - self._last_step_status >= 0.5 or done in (1, total):
            self._last_step_status = now
            self.notifier.status(f"{claim.name}: step {done}/{total}, {len(names)} queued")
        current = dict(self.status.data.get("current") or {}, step=done, total=total)
        self.status.update(throttle=0.25, current=current, queue_length=len(names), queued=names[:100],
                           queue_by_owner=self._queue_by_owner())

    # -- one job: the boundary ------------------------------------------------------------------

    def process(self, claim: Claim, held: Held | None = None) -> None:
        """Move one claim as far as it can go; whatever it raises stays with this job."""
        bound = log.bind(job=claim.name, job_id=claim.job_id)
        ctx = JobContext(claim, held, bound, painted=held.result if held is not None else None)
        self.current = ctx
        try:
            self._check_ours(claim)
            pending = held.pending_failure if held is not None else None
            if pending is not None and claim.state is not ClaimState.FAILING:
                self._fail(claim, pending, bound)
                return
            if held is not None and self.held.expired(held, time.monotonic()) and claim.state is not ClaimState.PUBLISHED:
                # (A published job is never turned into a failure: it keeps being retried.)
                self._fail(claim, self._exhausted(held), bound)
                return
            if claim.state is ClaimState.PUBLISHING:
                self._settle_publication(claim, bound)
            if claim.state is ClaimState.CLAIMED:
                self._paint(ctx)
            if claim.state is ClaimState.PUBLISHED:
                self._archive(ctx)
            elif claim.state is ClaimState.FAILING:
                self._fail(claim, self._recorded_error(claim), bound)
        except BaseException as exc:  # noqa: BLE001 - fault isolation: this job's outcome, nobody else's
            self._settle(ctx, exc)
        finally:
            self.current = None

    def _check_ours(self, claim: Claim) -> None:
        """Fleet: write nothing for a job another device took over, nor while our lease is stale."""
        if self.fleet is None:
            return
        self._check_lease()
        try:
            os.stat(claim.dir)
        except FileNotFoundError:
            raise TakenOver(f"{claim.name} was taken over by another device while this one was away") from None
        except OSError as exc:  # the share is away (ENOTCONN, EIO): wait, do not give the job up
            raise TransientError("share_unreachable", f"cannot reach this job's claim on the share ({exc.strerror})") from exc

    def _check_lease(self) -> None:
        if self.fleet is not None and not self.fleet.lease_fresh():
            raise TransientError("share_unreachable", "this device has not reached the share's state folder "
                                 "for over half a lease; nothing is written until it does")

    def _settle(self, ctx: JobContext, exc: BaseException) -> None:
        """The job's outcome from what it raised: left claimed, held for a retry, or failed."""
        claim, held, bound = ctx.claim, ctx.held, ctx.log
        verdict = boundary.classify(exc, self.config.folders(), claim.inputs)
        if verdict.code is Code.TAKEN_OVER:
            bound.warning("job.taken_over", note="another device has it; this one drops its work without writing")
            return
        if verdict.action is Action.LEAVE:
            self._undo_attempt(ctx)
            bound.info("job.interrupted", note="left claimed; it runs again at the next start")
            return
        if verdict.action is Action.HOLD:
            self._undo_attempt(ctx)
            self._hold(claim, verdict, held, ctx.painted, bound)
            return
        if verdict.unexpected:
            bound.error("job.crashed", code=verdict.code, error=verdict.message, exc_info=exc)
        pending = verdict.job_error()
        try:
            self._fail(claim, pending, bound)
        except BaseException as again:  # noqa: BLE001 - failed/ or state unwritable: hold the failure
            second = boundary.classify(again, self.config.folders(), claim.inputs)
            if second.unexpected:
                bound.error("job.fail_crashed", code=second.code, error=second.message, exc_info=again)
            self._hold(claim, second, held, None, bound, pending_failure=pending)

    def _undo_attempt(self, ctx: JobContext) -> None:
        if not ctx.attempt_counted:
            return
        try:
            self.spool.undo_attempt(ctx.claim)
        except Exception as exc:  # noqa: BLE001 - at worst the attempt counts towards poison_after
            ctx.log.warning("job.attempt_not_undone", error=shorten(str(exc)))

    def _recorded_error(self, claim: Claim) -> JobError:
        record = claim.record.get("error") or claim.record.get("rejection") or {}
        return JobError(str(record.get("code", "internal_error")), str(record.get("message", "")),
                        dict(record.get("details") or {}))

    def _exhausted(self, held: Held) -> JobError:
        timeout = self.held.hold_timeout
        return JobError(
            "retries_exhausted",
            shorten(f"could not be finished for {timeout:g} s (limits.hold_timeout): {held.message}"),
            {"last_code": held.code, "retries": held.failures, "hold_timeout": timeout},
        )

    # -- one job: its steps ---------------------------------------------------------------------

    def _paint(self, ctx: JobContext) -> JobResult:
        """claimed -> published; returns the painted result (kept if publication must wait)."""
        claim, bound, result = ctx.claim, ctx.log, ctx.painted
        config = self.config
        assert self.status is not None
        started, started_seen = time.time(), time.monotonic()
        queue_wait = claim.queue_wait(started, started_seen)
        if result is None:
            problems = self.spool.unsafe_inputs(claim)
            if problems:
                detail = "; ".join(f"{p} {why}" for p, why in sorted(problems.items()))
                raise JobError("job_unsafe", f"unsafe input: {detail}", {"entries": problems})
            limit = config.limits.max_input_bytes
            too_big = self.spool.oversized_inputs(claim, limit)
            if too_big:
                raise JobError(Code.INPUT_TOO_LARGE, oversize_message(too_big, limit),
                               {"entries": too_big, "max_input_bytes": limit})
            self.spool.begin_attempt(claim, config.limits.poison_after)
            ctx.attempt_counted = True
            budget = config.limits.max_job_seconds
            ctx.deadline = time.monotonic() + budget if budget > 0 else None
            self.status.update(state="busy", current={"name": claim.name, "job_id": claim.job_id, "step": 0,
                                                      "total": None, "started": timestamp(started)})
            options = load_job_options(claim.input_path("prompt"), config.limits)
            image = claim.input_path("image")
            assert image is not None
            request = build_request(claim.name, image, claim.input_path("mask"), options, config,
                                     model_defaults=self.engine.model_defaults)
            bound.info("job.started", attempt=claim.attempts, queue_wait_seconds=round(queue_wait, 3),
                       steps=request.params.steps, seed=request.params.seed)
            result = run_job(self.engine, request, config, on_step=self._on_step)
            self._ping()
        finished, finished_seen = time.time(), time.monotonic()
        extra = claim_fields(job_id=claim.job_id, host=self.host, device=self.device, arrived=claim.arrived,
                             queue_wait=queue_wait, started=started, finished=finished, attempts=claim.attempts,
                             entries=claim.entries())
        ctx.painted = result  # kept by a hold if publication must wait: no repaint
        self._check_ours(claim)
        pausepoints.reached(PausePoint.AFTER_OWNERSHIP_CHECK)
        # Staged in the claim first (fenced: a take-over renames the claim and its stage
        # away), then published from there by no-replace links (store/outbox.py).
        progress = self._fenced(claim, outbox.stage, claim.dir, result, extra)
        self._fenced(claim, self.spool.mark, claim, ClaimState.PUBLISHING, publishing=progress)
        image_name, sidecar_name = self._publish(claim)
        self.status.increment("jobs_done")
        bound.info(
            "job.done", output=image_name, sidecar=sidecar_name,
            seconds=round(finished_seen - started_seen, 3), timings=result.sidecar.get("timings"),
            regions=len(result.regions),
        )
        return result

    def _publish(self, claim: Claim) -> tuple[str, str]:
        """S2-S6 of the fenced publication, from what the claim records; -> published."""

        def record(progress: dict[str, Any]) -> None:
            self._check_lease()  # a stale lease stops before the next step (the fence stops the rest)
            self.spool.mark(claim, ClaimState.PUBLISHING, publishing=progress)

        image_name, sidecar_name = outbox.publish_staged(
            self.config.paths.outbox, claim.dir, claim.record["publishing"], record, shared=self.fleet is not None)
        pausepoints.reached(PausePoint.AFTER_SIDECAR)
        self._fenced(claim, self.spool.mark, claim, ClaimState.PUBLISHED,
                     published={"image": image_name, "sidecar": sidecar_name})
        return image_name, sidecar_name

    def _fenced(self, claim: Claim, op: Any, *args: Any, **kwargs: Any) -> Any:
        """op, whose ENOENT means the claim was taken over when its folder is gone."""
        try:
            return op(*args, **kwargs)
        except FileNotFoundError:
            if self.fleet is not None and not os.path.lexists(claim.dir):
                raise TakenOver(f"{claim.name} was taken over by another device during publication") from None
            raise

    def _settle_publication(self, claim: Claim, bound: Any) -> None:
        """A claim stopped (or taken over) while publishing: its publication goes on from the
        stage; a claim an older version left without a stage is published if its sidecar is
        out, else painted again."""
        names = claim.record.get("publishing") or {}
        if outbox.is_staged(names) and os.path.lexists(claim.dir / outbox.STAGE / outbox.STAGED_IMAGE):
            image_name, sidecar_name = self._publish(claim)
            bound.info("job.published_after_stop", output=image_name, sidecar=sidecar_name)
            if self.status is not None:
                self.status.increment("jobs_done")
            return
        published = bool(names) and "image" in names and outbox.settle_publication(
            self.config.paths.outbox, claim.job_id, names, claim.dir, shared=self.fleet is not None)
        if published:
            self.spool.mark(claim, ClaimState.PUBLISHED, published={"image": names["image"], "sidecar": names["sidecar"]})
            bound.info("job.published_before_stop", output=names["image"], sidecar=names["sidecar"])
        else:
            self.spool.forget(claim, "publishing")
            self.spool.mark(claim, ClaimState.CLAIMED)

    def _archive(self, ctx: JobContext) -> None:
        claim, bound = ctx.claim, ctx.log
        self._check_ours(claim)
        target = records.archive_inputs(self.spool, claim, self.config.paths.archive, self.config.output.after_success,
                                        self.config.limits.max_input_bytes)
        bound.info("job.archived", archive=str(target) if target else "deleted")

    def _hold(self, claim: Claim, verdict: boundary.Verdict, held: Held | None, result: Any, bound: Any,
              pending_failure: JobError | None = None) -> None:
        assert self.status is not None
        entry = self.held.hold(claim, verdict.code, verdict.message, time.monotonic(), held, result, pending_failure)
        delay = round(entry.retry_at - time.monotonic(), 3)
        bound.error("job.retry_later", code=verdict.code, error=verdict.message, retry_in_seconds=delay,
                    held=len(self.held))
        self.status.update(health=for_display(f"{verdict.message}, retrying", 300),
                           last_error=error_summary(claim.name, verdict.code, verdict.message))

    def _fail(self, claim: Claim, error: JobError, bound: Any) -> None:
        assert self.status is not None
        self._check_ours(claim)
        path = records.fail_claim(self.spool, claim, error, self.config.paths.failed, time.time(),
                                 {"device": self.device}, self.config.limits.max_input_bytes)
        bound.warning("job.failed", code=error.code, error=shorten(error.message),
                      failed=str(path) if path else None)
        self.status.increment("jobs_failed")
        self.status.update(last_error=error_summary(claim.name, error.code, error.message))
