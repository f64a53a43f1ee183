"""Carrying out what a closed round decided: publish the refine, or write the registry and publish
the deploy; and approve(), which does the deploy a person held back. Every step is idempotent (fixed
event ids, a registry entry recognised as already written), so a redelivered result or a second
replica finishing the same step changes nothing."""
import logging

from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import Tracer

from deployer.campaign import (AUTO_GATE, CampaignStore, grant_approval, mark_abandoned, mark_announced, mark_deployed,
                               mark_refined, refine_event, reject_deploy)
from shared import subjects
from shared.broker import publish
from shared.registry import Registry, StaleRevision
from shared.schemas import CampaignState, Deploy, DeployApproval, DeployPending, Refine, RegistryEntry

log = logging.getLogger("kernelloop.deployer")


class IncumbentChanged(Exception):
    """The key is served by something other than what the winner was measured against."""


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def _tracer(tracer: Tracer | None) -> Tracer:
    return tracer or trace.get_tracer("kernelloop.deployer")


async def deploy(broker: NatsBroker, registry: Registry, state: CampaignState, trace_id: str | None,
                 tracer: Tracer | None = None, attempts: int = 5) -> Deploy:
    """Write the round's winner to the registry and publish `deploy`."""
    campaign, winner = state.campaign, state.winner
    attributes = {"campaign_id": campaign.campaign_id, "kernel_key": str(campaign.key), "op": campaign.key.op,
                  "bucket": campaign.key.bucket, "variant_id": winner.variant_id, "strategy": winner.strategy,
                  "speedup": winner.weighted_speedup, "approved_by": state.approved_by or ""}
    with _tracer(tracer).start_as_current_span("deploy", attributes=attributes):
        trace_id = trace_id or current_trace_id()
        for _ in range(attempts):
            current = await registry.read(campaign.key)
            ours = current and current.entry.campaign_id == campaign.campaign_id
            if ours and current.entry.variant_id == winner.variant_id:
                # An earlier attempt wrote it and then failed before the event went out.
                revision, previous = current.revision, current.entry.previous_variant_id
                break
            serving = current.entry.variant_id if current else None
            if serving != campaign.incumbent.variant_id:
                raise IncumbentChanged(
                    f"campaign {campaign.campaign_id}: {winner.variant_id} was measured against "
                    f"{campaign.incumbent.variant_id or 'the fallback'}, but {serving or 'the fallback'} serves "
                    f"{campaign.key} now; not deploying a speedup over something no longer served")
            entry = RegistryEntry(variant_id=winner.variant_id, source=winner.source, params=winner.params,
                                  speedup=winner.weighted_speedup, campaign_id=campaign.campaign_id,
                                  approved_by=state.approved_by, previous_variant_id=serving, trace_id=trace_id)
            try:
                revision = await registry.write(campaign.key, entry, current.revision if current else None)
                previous = serving
                break
            except StaleRevision:
                continue  # re-read: either our own entry (a twin replica) or a different incumbent
        else:
            raise StaleRevision(f"registry key {campaign.key} kept changing under {attempts} deploy attempts")
        event = Deploy(event_id=f"deploy-{campaign.campaign_id}", campaign_id=campaign.campaign_id, key=campaign.key,
                       variant_id=winner.variant_id, previous_variant_id=previous, speedup=winner.weighted_speedup,
                       speedup_ci_low=winner.speedup_ci_low, revision=revision, approved_by=state.approved_by,
                       trace_id=trace_id)
        await publish(broker, subjects.DEPLOY, event)
    log.info("deployed %s for %s at revision %d (%s)", winner.variant_id, campaign.key, revision, state.approved_by)
    return event


async def carry_out(broker: NatsBroker, store: CampaignStore, registry: Registry, state: CampaignState,
                    trace_id: str | None = None, tracer: Tracer | None = None) -> Refine | Deploy | None:
    """Do what the state still owes (a refine, a deploy, or the notice of one awaiting approval),
    then record that it is done."""
    campaign_id = state.campaign.campaign_id
    if state.status == "awaiting_approval" and not state.announced:
        event = pending_event(state)
        await publish(broker, subjects.DEPLOY_PENDING, event)
        await store.update(campaign_id, lambda s: (mark_announced(s), None))
        log.warning("campaign %s: %s awaits approval on %s", campaign_id, event.variant_id, subjects.DEPLOY_APPROVAL)
        return None
    if state.pending == "refine":
        event = refine_event(state)
        await publish(broker, subjects.REFINE, event)
        await store.update(campaign_id, lambda s: (mark_refined(s, event.round), None))
        log.info("campaign %s: refine for round %d (%d rounds left)", campaign_id, event.round, event.rounds_left)
        return event
    if state.pending == "deploy":
        try:
            event = await deploy(broker, registry, state, trace_id, tracer)
        except IncumbentChanged as e:
            log.error("%s", e)
            await store.update(campaign_id, lambda s: (mark_abandoned(s, str(e)), None))
            return None
        await store.update(campaign_id, lambda s: (mark_deployed(s, event.revision), None))
        return event
    return None


async def approve(broker: NatsBroker, campaign_id: str, who: str, tracer: Tracer | None = None) -> Deploy:
    """Deploy the winner of a campaign that waits for a person's approval. `broker` must be connected."""
    if not who or who == AUTO_GATE:
        raise ValueError("approval needs the name of the person who approves")
    store, registry = await CampaignStore.open(broker), await Registry.open(broker)

    def _grant(state: CampaignState | None) -> tuple[CampaignState, None]:
        if state is None:
            raise LookupError(f"no campaign {campaign_id} in {subjects.CAMPAIGN_BUCKET}")
        if state.pending == "deploy" and state.approved_by == who:
            return state, None  # the same approval, retried after it was cut short: finish it
        return grant_approval(state, who), None

    state, _ = await store.update(campaign_id, _grant)
    # The campaign's own trace, so `kernelloop trace` shows the approval's deploy with its rounds.
    event = await carry_out(broker, store, registry, state, state.trace_id, tracer)
    if not isinstance(event, Deploy):
        reason = (await store.get(campaign_id)).reason
        raise RuntimeError(f"campaign {campaign_id}: approved, but not deployed: {reason}")
    return event


def pending_event(state: CampaignState) -> DeployPending:
    """The notice of a held winner; its id is fixed per campaign so a retry is de-duplicated."""
    campaign, winner = state.campaign, state.winner
    policy = state.reason.split("; held: ", 1)[-1] if "; held: " in state.reason else "approval required"
    return DeployPending(event_id=f"pending-{campaign.campaign_id}", campaign_id=campaign.campaign_id, key=campaign.key,
                         variant_id=winner.variant_id, previous_variant_id=campaign.incumbent.variant_id,
                         speedup=winner.weighted_speedup, speedup_ci_low=winner.speedup_ci_low,
                         time_share=campaign.time_share, policy=policy, trace_id=state.trace_id)


async def reject(broker: NatsBroker, campaign_id: str, who: str, reason: str = "") -> CampaignState:
    """Refuse the winner of a campaign that waits for approval; nothing is deployed."""
    if not who or who == AUTO_GATE:
        raise ValueError("a rejection needs the name of the person who rejects")
    store = await CampaignStore.open(broker)

    def _reject(state: CampaignState | None) -> tuple[CampaignState, None]:
        if state is None:
            raise LookupError(f"no campaign {campaign_id} in {subjects.CAMPAIGN_BUCKET}")
        if state.status == "rejected" and state.rejected_by == who:
            return state, None  # the same rejection, redelivered
        return reject_deploy(state, who, reason), None

    state, _ = await store.update(campaign_id, _reject)
    log.info("campaign %s: %s", campaign_id, state.reason)
    return state


def _campaign_context(state: CampaignState | None) -> trace.Context | None:
    """The context of the span that held the campaign's winner, so a decision joins its trace."""
    if state is None or not state.trace_id or not state.span_id:
        return None
    parent = trace.SpanContext(int(state.trace_id, 16), int(state.span_id, 16), is_remote=True,
                               trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


async def decide_approval(broker: NatsBroker, approval: DeployApproval, tracer: Tracer | None = None) -> Deploy | None:
    """A person's approve or reject, from any client: recorded on the campaign's trace with who made
    it (the approval's own trace is linked). Returns the deploy an approval made."""
    state = await (await CampaignStore.open(broker)).get(approval.campaign_id)
    here = trace.get_current_span().get_span_context()
    links = [trace.Link(here)] if here.is_valid else []
    attributes = {"campaign_id": approval.campaign_id, "decision": approval.decision, "decided_by": approval.by,
                  "reason": approval.reason}
    if state is not None:
        key = state.campaign.key
        attributes.update(kernel_key=str(key), op=key.op, bucket=key.bucket)
        if state.winner is not None:
            attributes.update(variant_id=state.winner.variant_id, speedup=state.winner.weighted_speedup or 0.0)
    with _tracer(tracer).start_as_current_span(approval.decision, context=_campaign_context(state), links=links,
                                               attributes=attributes) as span:
        try:
            if approval.decision == "reject":
                await reject(broker, approval.campaign_id, approval.by, approval.reason)
                return None
            event = await approve(broker, approval.campaign_id, approval.by, tracer)
        except (LookupError, ValueError, RuntimeError) as e:
            # A decision on a campaign that is not waiting cannot succeed on redelivery: say so, ack.
            span.record_exception(e)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(e)))
            log.error("%s of campaign %s by %s refused: %s", approval.decision, approval.campaign_id, approval.by, e)
            return None
        span.set_attribute("revision", event.revision)
        return event
