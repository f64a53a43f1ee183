"""Running canaries: the workloads' canary.report windows go into their hardware's canary record;
after each report the statistics (deployer/canary.py) decide, and a verdict is carried out through
shared/registry.py: promote writes the same entry again as promoted, withdraw rolls the key back to
the incumbent with approved_by "rollback: canary", which makes the variant one the gate never
deploys to that key again (shared/registry.py withdrawn). Either way a Deploy says so and a
"canary.decide" span on the campaign's trace carries the figures. When a canary is done, the
deploys that waited for its hardware are carried out in turn.

A sweep every few seconds finishes what a crash left undone (a verdict not yet carried out, a
waiting deploy not yet started) and withdraws a canary that reached its time limit undecided.
Every step is idempotent: fixed event ids, registry writes that name the revision they replace."""
import asyncio
import logging
from datetime import datetime, timezone

from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import Tracer

from deployer.campaign import CampaignStore
from deployer.canary_state import (CanaryConfig, CanaryStore, add_report, judge, mark_done, stop_waiting,
                                   superseded, written)
from deployer.rollout import carry_out, span_context
from shared import subjects
from shared.broker import durable_subscriber, publish
from shared.registry import Registry, StaleRevision
from shared.schemas import CanaryReport, CanaryState, Deploy

log = logging.getLogger("kernelloop.deployer")

ROLLBACK_BY = "rollback: canary"
SWEEP_S = 2.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def on_report(broker: NatsBroker, report: CanaryReport, config: CanaryConfig,
                    tracer: Tracer | None = None) -> CanaryState | None:
    """Count a workload's windows, judge, and carry out a verdict. Returns the hardware's record."""
    canaries = await CanaryStore.open(broker)
    now = _now()
    run, note = await canaries.update(report.key.hardware, lambda r: add_report(r, report, now))
    if note:
        log.debug("canary report from %s: %s", report.source, note)
        return run
    return await advance(broker, canaries, run, config, tracer)


async def advance(broker: NatsBroker, canaries: CanaryStore, run: CanaryState | None, config: CanaryConfig,
                  tracer: Tracer | None = None) -> CanaryState | None:
    """Whatever the hardware's canary owes next: a verdict, carrying it out, the waiting deploys."""
    if run is None:
        return None
    registry = await Registry.open(broker)
    hardware = run.hardware
    if not run.done and run.revision is not None and run.action is None:
        current = await registry.read(run.key)
        if current is None or current.revision != run.revision:
            why = (f"the registry serves {current.entry.variant_id} at revision {current.revision}" if current
                   else "the key was deleted")
            revision = run.revision
            run, _ = await canaries.update(hardware, lambda r: superseded(r, revision, why, _now()))
            log.warning("canary of %s on %s ended: %s", run.variant_id, run.key, why)
        else:
            now = _now()
            run, _ = await canaries.update(hardware, lambda r: judge(r, config, now))
    if run is not None and not run.done and run.action is not None:
        run = await settle(broker, registry, canaries, run, tracer)
    if run is not None and run.done and run.waiting:
        await start_waiting(broker, registry, canaries, run, config, tracer)
        run = await canaries.get(hardware)
    return run


def _attributes(run: CanaryState) -> dict:
    low, high = (round(v, 4) for v in run.step_speedup_ci) if run.step_speedup_ci else (None, None)
    attributes = {"campaign_id": run.campaign_id, "kernel_key": str(run.key), "op": run.key.op,
                  "bucket": run.key.bucket, "variant_id": run.variant_id,
                  "incumbent": run.incumbent_variant_id or "fallback", "action": run.action or "",
                  "reason": run.reason, "speedup": round(run.step_speedup, 4) if run.step_speedup else None,
                  "speedup_ci_low": low, "speedup_ci_high": high,
                  "windows": run.judged_windows, "sources": len(run.windows),
                  "measures": ",".join(sorted(set(run.measures.values()))), "revision": run.revision,
                  "benchmark_speedup": run.speedup}
    return {k: v for k, v in attributes.items() if v is not None}


async def settle(broker: NatsBroker, registry: Registry, canaries: CanaryStore, run: CanaryState,
                 tracer: Tracer | None = None) -> CanaryState:
    """Carry out the record's action through the registry, publish the Deploy that says so, and
    record the canary as done. A step an earlier attempt finished is recognised and not repeated."""
    tracer = tracer or trace.get_tracer("kernelloop.deployer")
    with tracer.start_as_current_span("canary.decide", context=span_context(run.trace_id, run.span_id),
                                      attributes=_attributes(run)) as span:
        for _ in range(3):  # a twin replica settling the same canary may write first: then it is recognised
            after = [r for r in await registry.history(run.key) if r.revision > run.revision]
            if after:
                event = _done_before(run, after[0])
                break
            event = await (_promote if run.action == "promote" else _withdraw)(registry, run)
            if event is not None:
                break
        if event is None:
            moved = f"revision {after[0].revision}" if after else "a later revision"
            outcome = f"superseded: the registry moved on to {moved} before the {run.action}"
        else:
            await publish(broker, subjects.DEPLOY, event)
            outcome = (f"promoted at revision {event.revision}" if run.action == "promote" else
                       f"withdrawn at revision {event.revision}: {event.variant_id} serves again")
        span.set_attribute("outcome", outcome)
    run, _ = await canaries.update(run.hardware, lambda r: mark_done(r, outcome, _now()))
    log.warning("canary of %s on %s: %s (%s)", run.variant_id, run.key, outcome, run.reason)
    return run


def _done_before(run: CanaryState, after) -> Deploy | None:
    """The Deploy for the revision that followed the canary's, when it is this canary's own promote
    or withdrawal (written by an earlier attempt, or a twin replica); None when someone else's."""
    entry = after.entry
    if run.action == "promote" and entry is not None and entry.stage == "promoted" \
            and entry.variant_id == run.variant_id and entry.campaign_id == run.campaign_id:
        return _promoted_event(run, after.revision, entry.approved_by)
    if run.action == "withdraw" and (entry is None or entry.approved_by == ROLLBACK_BY):
        return _withdrawn_event(run, after.revision, entry)
    return None


async def _promote(registry: Registry, run: CanaryState) -> Deploy | None:
    try:
        revision = await registry.promote(run.key, run.revision, run.step_speedup)
    except StaleRevision:
        return None
    return _promoted_event(run, revision.revision, revision.entry.approved_by)


async def _withdraw(registry: Registry, run: CanaryState) -> Deploy | None:
    try:
        revision = await registry.rollback(run.key, approved_by=ROLLBACK_BY, trace_id=run.trace_id,
                                           expect=run.revision)
    except StaleRevision:
        return None
    return _withdrawn_event(run, revision.revision, revision.entry)


def _figures(run: CanaryState) -> dict:
    low, high = run.step_speedup_ci or (None, None)
    return dict(step_speedup=run.step_speedup, step_speedup_ci_low=low, step_speedup_ci_high=high, detail=run.reason)


def _promoted_event(run: CanaryState, revision: int, approved_by: str) -> Deploy:
    return Deploy(event_id=f"promote-{run.campaign_id}", campaign_id=run.campaign_id, key=run.key,
                  variant_id=run.variant_id, previous_variant_id=run.incumbent_variant_id, speedup=run.speedup,
                  speedup_ci_low=run.speedup_ci_low, revision=revision, approved_by=approved_by,
                  trace_id=run.trace_id, stage="promoted", **_figures(run))


def _withdrawn_event(run: CanaryState, revision: int, restored) -> Deploy:
    return Deploy(event_id=f"withdraw-{run.campaign_id}", campaign_id=run.campaign_id, key=run.key,
                  # the fallback has no variant id; the op's fallback is named as such
                  variant_id=restored.variant_id if restored else "fallback", previous_variant_id=run.variant_id,
                  speedup=restored.speedup if restored else 1.0, speedup_ci_low=restored.speedup if restored else 1.0,
                  revision=revision, approved_by=ROLLBACK_BY, rollback=True, trace_id=run.trace_id,
                  stage="withdrawn", **_figures(run))


async def start_waiting(broker: NatsBroker, registry: Registry, canaries: CanaryStore, run: CanaryState,
                        config: CanaryConfig, tracer: Tracer | None = None) -> None:
    """The deploys that waited for this hardware, oldest first, until one starts its canary; a
    campaign that no longer owes a deploy leaves the list."""
    campaigns = await CampaignStore.open(broker)
    for campaign_id in list(run.waiting):
        state = await campaigns.get(campaign_id)
        if state is None or state.pending != "deploy" or state.status != "running":
            await canaries.update(run.hardware, lambda r: stop_waiting(r, campaign_id))
            continue
        event = await carry_out(broker, campaigns, registry, state, state.trace_id, tracer, config)
        if isinstance(event, Deploy):
            return  # its canary holds the hardware now; the rest wait for it
        if (await campaigns.get(campaign_id)).pending != "deploy":  # stood down (its incumbent changed)
            await canaries.update(run.hardware, lambda r: stop_waiting(r, campaign_id))
        else:
            return  # still waiting: someone else's canary took the hardware first


async def sweep(broker: NatsBroker, config: CanaryConfig, tracer: Tracer | None = None) -> None:
    """One pass over every hardware's canary: time limits, verdicts and waiting deploys left owed."""
    canaries = await CanaryStore.open(broker)
    for hardware in await canaries.hardware():
        run = await canaries.get(hardware)
        if run is None or (run.done and not run.waiting):
            continue
        if not run.done and run.revision is None:
            run = await _claimed(broker, canaries, run, config)
            if run is None or run.revision is None:
                continue
        try:
            await advance(broker, canaries, run, config, tracer)
        except Exception:  # one hardware's trouble must not stop the others' canaries
            log.exception("canary on %s: sweep failed; trying again in %g s", hardware, SWEEP_S)


async def _claimed(broker: NatsBroker, canaries: CanaryStore, run: CanaryState,
                   config: CanaryConfig) -> CanaryState | None:
    """A claim not yet marked written: the deploy is under way, or it wrote its entry and stopped
    before saying so (then the canary goes on from the registry), or it never will (then, after
    max_s, the hardware is free again)."""
    current = await (await Registry.open(broker)).read(run.key)
    if current is not None and current.entry.campaign_id == run.campaign_id and current.entry.stage == "canary" \
            and current.entry.variant_id == run.variant_id:
        now = _now()
        run, _ = await canaries.update(run.hardware, lambda r: written(r, run.campaign_id, current.revision,
                                                                      current.entry.trace_id, None, now))
        return run
    claimed_s = (_now() - run.claimed_at).total_seconds()
    if claimed_s > config.max_s:
        run, _ = await canaries.update(run.hardware, lambda r: mark_done(
            r, f"not deployed: claimed {claimed_s:.0f} s ago and never written", _now()))
    return run


async def keep_sweeping(broker: NatsBroker, config: CanaryConfig, tracer: Tracer | None = None) -> None:
    while True:
        await asyncio.sleep(SWEEP_S)
        try:
            await sweep(broker, config, tracer)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the server is away for a moment: sweep again later
            log.info("canary sweep: %s", e)


def register(broker: NatsBroker, config: CanaryConfig, tracer: Tracer | None = None) -> None:
    """Subscribe the deployer to canary.report (its own durable: a work queue over its replicas)."""

    @durable_subscriber(broker, subjects.CANARY_REPORT, ack_wait_s=60.0)
    async def on_canary_report(report: CanaryReport) -> None:
        await on_report(broker, report, config, tracer)
