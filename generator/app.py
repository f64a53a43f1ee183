"""The generator's FastStream shell: a hypothesis opens round 0, a refine asks for the next round;
the round itself (strategy, fallback, program database, the bandit's reward) is generator/rounds.py.
Every proposed variant goes out on variant.ready, and the benchmark verdicts come back (a second
consumer of bench.result) into the program database."""
import logging

from faststream import AckPolicy, FastStream
from faststream.nats import ConsumerConfig, PullSub
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from generator.database import ProgramStore
from generator.llm import LLMClient, LLMConfig
from generator.rounds import ARMS, Rounds
from shared import deadletters, subjects
from shared.broker import HEARTBEAT_S, durable_subscriber, make_broker, publish, stream
from shared.ops import get_op
from shared.schemas import BenchResult, Campaign, Failure, Hypothesis, Refine, Scored, VariantReady
from shared.settings import Settings

log = logging.getLogger("kernelloop.generator")


def active_strategies(settings: Settings) -> tuple[list[str], str]:
    """The strategies this generator may choose from, and why any is off (for start-up logs and
    `kernelloop up`)."""
    wanted = [s.strip() for s in settings.generator_strategies.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ARMS]
    if unknown:
        raise ValueError(f"KERNELLOOP_STRATEGIES: unknown strategy {', '.join(unknown)}; known: {', '.join(ARMS)}")
    note = ""
    if "llm" in wanted and LLMConfig.from_settings(settings) is None:
        wanted.remove("llm")
        note = "LLM off: OPENAI_BASE_URL is not set"
    return wanted, note


def build_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    broker, app = make_broker(settings.nats_url, tracer_provider)
    tracer = trace.get_tracer("kernelloop.generator", tracer_provider=tracer_provider)
    # Declared for the AsyncAPI document; messages go out through shared.broker.publish.
    broker.publisher(subjects.VARIANT_READY, stream=stream(), schema=VariantReady,
                     title="variant.ready", description="one variant to benchmark")
    allowed, note = active_strategies(settings)
    # crossover of programs without a template is the LLM's work too
    llm_config = LLMConfig.from_settings(settings) if {"llm", "crossover"} & set(allowed) else None
    client = LLMClient(llm_config) if llm_config else None
    opened: list[Rounds] = []

    async def rounds() -> Rounds:  # the program store opens on the first message, once connected
        if not opened:
            opened.append(Rounds(await ProgramStore.open(broker), client, allowed, tracer))
        return opened[0]

    @app.on_startup
    def say_strategies() -> None:
        models = f" (models {', '.join(m.name for m in llm_config.models)} at {llm_config.base_url})" if llm_config else ""
        log.info("generator strategies: %s%s%s", ", ".join(allowed) or "none", models, f"; {note}" if note else "")

    async def generate(campaign: Campaign, round: int, tried: set[str], best: list[Scored],
                       failures: list[Failure] = ()) -> None:
        key = campaign.key
        with tracer.start_as_current_span("generate") as span:
            span.set_attributes({"campaign_id": campaign.campaign_id, "op": key.op, "bucket": key.bucket,
                                 "kernel_key": str(key), "round": round})
            try:
                op = get_op(key.op)
            except KeyError as e:
                log.error("campaign %s: field campaign.key.op: %s; nothing generated", campaign.campaign_id, e)
                span.set_attribute("status", "rejected")
                raise deadletters.Refused(f"campaign.key.op: {e.args[0]}") from None
            ready = await (await rounds()).variants(op, campaign, round, tried, best, failures, span)
            if not ready:
                log.warning("no new variants for %s (round %d of %s)", campaign.campaign_id, round, key)
                span.set_attribute("status", "exhausted")
                return
            for variant in ready:
                await publish(broker, subjects.VARIANT_READY, variant)
            span.set_attributes({"status": "ok", "variants": len(ready)})
            log.info("campaign %s round %d: %d variants for %s", campaign.campaign_id, round, len(ready), key)

    @durable_subscriber(broker, subjects.HYPOTHESIS)
    async def on_hypothesis(event: Hypothesis) -> None:
        await generate(event.campaign, 0, set(), [])

    @durable_subscriber(broker, subjects.REFINE)
    async def on_refine(event: Refine) -> None:
        # a failed variant is not worth a second benchmark either
        tried = set(event.tried) | {f.variant_id for f in event.failures}
        await generate(event.campaign, event.round, tried, event.best, event.failures)

    # a second consumer of bench.result, beside the deployer's: verdicts into the program database
    @broker.subscriber(subjects.BENCH_RESULT, stream=stream(), durable=subjects.GENERATOR_RESULTS_DURABLE,
                       pull_sub=PullSub(batch_size=1, timeout=2.0),
                       config=ConsumerConfig(ack_wait=3 * HEARTBEAT_S, max_deliver=deadletters.MAX_DELIVER),
                       ack_policy=AckPolicy.NACK_ON_ERROR)
    async def on_bench_result(result: BenchResult) -> None:
        earned = await (await rounds()).record(result)
        if earned is None:
            return
        with tracer.start_as_current_span("bandit.reward", attributes={
                "campaign_id": earned.campaign_id, "op": earned.op, "round": earned.round, "strategy": earned.arm,
                "reward": earned.value, "best_before": earned.best_before, "best_after": earned.best_after}):
            log.info("campaign %s round %d: strategy %s earned %.3f", earned.campaign_id, earned.round, earned.arm,
                     earned.value)

    return app
