"""The generator's FastStream shell: a hypothesis opens round 0, a refine asks for the next round;
every proposed variant goes out on variant.ready."""
import logging

from faststream import FastStream
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from generator.search import propose_round
from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish, stream
from shared.ops import get_op
from shared.schemas import Campaign, Hypothesis, Refine, Scored, VariantReady
from shared.settings import Settings

log = logging.getLogger("kernelloop.generator")

# Proposing a round renders and checks at most a few hundred small sources: seconds at most.
ACK_WAIT_S = 60.0


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    tracer = trace.get_tracer("kernelloop.generator", tracer_provider=tracer_provider)
    # Declared for the AsyncAPI document; messages go out through shared.broker.publish.
    broker.publisher(subjects.VARIANT_READY, stream=stream(), schema=VariantReady,
                     title="variant.ready", description="one variant to benchmark")

    async def generate(campaign: Campaign, round: int, tried: set[str], best: list[Scored]) -> None:
        key = campaign.key
        with tracer.start_as_current_span("generate") as span:
            span.set_attributes({"campaign_id": campaign.campaign_id, "op": key.op,
                                 "kernel_key": str(key), "round": round,
                                 "strategy": "grid" if round == 0 else "local"})
            try:
                op = get_op(key.op)
            except KeyError as e:
                log.error("campaign %s: field campaign.key.op: %s; nothing generated", campaign.campaign_id, e)
                span.set_attribute("status", "rejected")
                return
            n = campaign.budget.variants_per_round
            ready = propose_round(op, campaign, round, n, tried, best)
            span.set_attribute("variants", len(ready))
            if not ready:
                log.warning("search space exhausted for %s (round %d of %s)", campaign.campaign_id, round, key)
                span.set_attribute("status", "exhausted")
                return
            for variant in ready:
                await publish(broker, subjects.VARIANT_READY, variant)
            span.set_attribute("status", "ok")
            log.info("campaign %s round %d: %d variants for %s", campaign.campaign_id, round, len(ready), key)

    @durable_subscriber(broker, subjects.HYPOTHESIS, ack_wait_s=ACK_WAIT_S)
    async def on_hypothesis(event: Hypothesis) -> None:
        await generate(event.campaign, 0, set(), [])

    @durable_subscriber(broker, subjects.REFINE, ack_wait_s=ACK_WAIT_S)
    async def on_refine(event: Refine) -> None:
        # a failed variant is not worth a second benchmark either
        tried = set(event.tried) | {f.variant_id for f in event.failures}
        await generate(event.campaign, event.round, tried, event.best)

    return app
