"""The deployer's answer to a live regression: when the detector reports that a freshly deployed
variant serves slower than what it replaced (usage.changed, reason regression, after_deploy), the
registry goes back to the previous variant and a Deploy with rollback=True says so.

Only the deploy the event names is rolled back: when the registry serves something else by now
(a later deploy, or a rollback already done for a redelivered copy of the event), nothing happens,
so the answer is idempotent."""
import logging

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, NatsBroker, PullSub
from opentelemetry import trace
from opentelemetry.trace import Tracer

from shared import subjects
from shared.broker import publish, stream
from shared.registry import Registry, StaleRevision
from shared.schemas import Deploy, UsageChanged

log = logging.getLogger("kernelloop.deployer")

ROLLBACK_BY = "rollback: live regression"


def rollback_event_id(usage_changed_id: str) -> str:
    return f"rollback-{usage_changed_id}"[:128]


async def answer_regression(broker: NatsBroker, registry: Registry, event: UsageChanged,
                            tracer: Tracer | None = None) -> Deploy | None:
    """Roll back the deploy a regression event names; returns the Deploy published, or None when
    the event asks for nothing (not a regression after a deploy) or the deploy is no longer live."""
    if event.reason != "regression" or not event.after_deploy or event.variant_id is None:
        return None
    tracer = tracer or trace.get_tracer("kernelloop.deployer")
    attributes = {"kernel_key": str(event.key), "op": event.key.op, "variant_id": event.variant_id}
    with tracer.start_as_current_span("rollback", attributes=attributes) as span:
        current = await registry.read(event.key)
        if current is None or current.entry.variant_id != event.variant_id:
            serving = current.entry.variant_id if current else "the fallback"
            log.info("regression of %s on %s: %s serves it now, nothing to roll back", event.variant_id, event.key,
                     serving)
            span.set_attribute("status", "already_replaced")
            return None
        ctx = span.get_span_context()
        trace_id = f"{ctx.trace_id:032x}" if ctx.is_valid else None
        try:
            revision = await registry.rollback(event.key, approved_by=ROLLBACK_BY, trace_id=trace_id)
        except StaleRevision:
            raise  # someone deployed meanwhile: redelivery re-reads and decides again
        restored = revision.entry
        deploy = Deploy(
            event_id=rollback_event_id(event.event_id),
            campaign_id=current.entry.campaign_id,
            key=event.key,
            # the fallback has no variant id; the op's fallback is named as such
            variant_id=restored.variant_id if restored else "fallback",
            previous_variant_id=event.variant_id,
            speedup=restored.speedup if restored else 1.0,
            speedup_ci_low=restored.speedup if restored else 1.0,
            revision=revision.revision,
            approved_by=ROLLBACK_BY,
            rollback=True,
            trace_id=trace_id,
        )
        await publish(broker, subjects.DEPLOY, deploy)
        span.set_attribute("status", "rolled_back")
    log.warning("rolled back %s on %s to %s at revision %d: %s", event.variant_id, event.key, deploy.variant_id,
                revision.revision, event.detail)
    return deploy


def register(broker: NatsBroker, tracer: Tracer | None = None) -> None:
    """Subscribe the deployer to usage.changed with its own durable (the detector's hypothesis stage
    has another), so every regression reaches both."""

    @broker.subscriber(subjects.USAGE_CHANGED, stream=stream(), durable=subjects.REGRESSION_DURABLE,
                       pull_sub=PullSub(batch_size=1, timeout=2.0),
                       config=ConsumerConfig(ack_wait=60.0, max_deliver=5),
                       ack_policy=AckPolicy.NACK_ON_ERROR)
    async def on_usage_changed(event: UsageChanged) -> None:
        if event.reason == "regression" and event.after_deploy:
            await answer_regression(broker, await Registry.open(broker), event, tracer)
