"""The generator's FastStream shell: a hypothesis opens round 0, a refine asks for the next round;
a bandit picks the round's strategy, every proposed variant goes out on variant.ready, and the
benchmark verdicts come back (a second consumer of bench.result) into the program database."""
import asyncio
import json
import logging
import math
import random

from faststream import AckPolicy, FastStream
from faststream.nats import ConsumerConfig, PullSub
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from generator.bandit import Bandit, reward
from generator.database import Program, ProgramDatabase, ProgramStore, RoundRecord
from generator.evolve import LLMStrategy, ParamCrossover, crossover_parents, has_template
from generator.llm import LLMClient, LLMConfig
from generator.prompts import PromptContext
from generator.search import propose_round, variant_event_id
from shared import deadletters, subjects
from shared.broker import HEARTBEAT_S, durable_subscriber, make_broker, publish, stream
from shared.ops import get_op
from shared.schemas import BenchResult, Campaign, Failure, Hypothesis, Refine, Scored, VariantReady
from shared.settings import Settings

log = logging.getLogger("kernelloop.generator")

ARMS = ("params", "llm", "crossover")


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
    store_cache: list[ProgramStore] = []

    async def store() -> ProgramStore:
        if not store_cache:
            store_cache.append(await ProgramStore.open(broker))
        return store_cache[0]

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
            programs = await store()
            db = await programs.load(key)
            db.learn(failures, best)  # the refine may overtake our own consumer of bench.result
            record = await programs.campaign(campaign.campaign_id)
            if round in record.rounds:  # a redelivery: the same variants again, de-duplicated by id
                ready = replay(db, campaign, round, record.rounds[round])
                span.set_attributes({"strategy": record.rounds[round].arm, "variants": len(ready), "replayed": True})
            else:
                tried = tried | {p.variant_id for p in db.programs.values() if p.campaign_id == campaign.campaign_id}
                # an LLM round takes minutes; shared.broker's heartbeats keep the message meanwhile
                ready = await propose(op, campaign, round, tried, best, db, span)
            if not ready:
                log.warning("no new variants for %s (round %d of %s)", campaign.campaign_id, round, key)
                span.set_attribute("status", "exhausted")
                return
            for variant in ready:
                await publish(broker, subjects.VARIANT_READY, variant)
            span.set_attributes({"status": "ok", "variants": len(ready)})
            log.info("campaign %s round %d: %d variants for %s", campaign.campaign_id, round, len(ready), key)

    async def propose(op, campaign: Campaign, round: int, tried: set[str], best: list[Scored],
                      db: ProgramDatabase, span) -> list[VariantReady]:
        """Choose the round's strategy, run it off the event loop, store the programs and the round."""
        programs = await store()
        bandit = Bandit.from_dict(await programs.get_json(bandit_key(campaign.key.op)))
        record = await programs.campaign(campaign.campaign_id)
        rng = random.Random(f"{campaign.campaign_id}:{round}:strategy")
        crossover = crossover_parents(op, best, db, campaign.key.bucket)
        arms = [a for a in allowed if (a != "params" or has_template(op)) and (a != "llm" or client)
                and (a != "crossover" or crossover == "params" or (crossover == "llm" and client))]
        if not arms:
            span.set_attribute("detail", f"no strategy can run for op {campaign.key.op}")
            return []
        arm, scores = bandit.choose(arms, rng)
        span.set_attributes({"strategy": arm, "bandit_scores": json.dumps(
            {a: (None if math.isinf(s) else round_(s)) for a, s in scores.items()})})
        n = campaign.budget.variants_per_round
        ready, used, models = [], arm, {}
        for candidate_arm in [arm] + [a for a in sorted(arms, key=lambda a: -scores[a]) if a != arm]:
            used = candidate_arm
            strategy = build_strategy(candidate_arm, op, campaign, round, db, record, crossover)
            ready = await asyncio.to_thread(propose_round, op, campaign, round, n, tried, best, strategy=strategy)
            models = getattr(strategy, "models", {})
            if ready:
                break
            span.add_event("strategy gave nothing", {"strategy": candidate_arm})
        if used != arm:
            span.set_attribute("strategy_fallback", used)
        if record.llm_calls:
            span.set_attributes({"llm_calls": record.llm_calls, "llm_tokens_used": record.tokens_used,
                                 "llm_cost_usd": record.cost_usd})
        best_before = max([1.0] + [s.speedup_ci_low for s in best])
        new = [Program(variant_id=v.variant_id, source=v.source, params=v.params, strategy=v.strategy,
                       parents=v.parents, campaign_id=campaign.campaign_id, round=round, bucket=campaign.key.bucket,
                       islands=db.island_for(v.parents, round), model=models.get(v.variant_id)) for v in ready]
        for p in new:
            db.add(p)
        moved = db.migrate(round)
        if moved:
            span.add_event("migration", {"moved": json.dumps(moved)})
        await programs.save(campaign.key, new + [db.programs[vid] for vid, _ in moved])

        def remember(r) -> None:
            r.tokens_used, r.llm_calls = max(r.tokens_used, record.tokens_used), max(r.llm_calls, record.llm_calls)
            r.cost_usd = max(r.cost_usd, record.cost_usd)
            r.attempts = record.attempts
            if ready:
                r.rounds[round] = RoundRecord(arm=used, variant_ids=[v.variant_id for v in ready],
                                              best_before=best_before)

        await programs.update_campaign(campaign.campaign_id, remember)
        if ready:
            await programs.update_json(bandit_key(campaign.key.op), lambda d: _pulled(d, used))
        return ready

    def build_strategy(arm: str, op, campaign: Campaign, round: int, db: ProgramDatabase, record, crossover):
        if arm == "params":
            return "params"
        if arm == "crossover" and crossover == "params":
            return ParamCrossover()
        rng = random.Random(f"{campaign.campaign_id}:{round}:{arm}")
        bucket = campaign.key.bucket
        if arm == "crossover":
            top = db.scored(bucket)
            context = PromptContext(op, campaign, round, "crossover", top[0], top[1:2])
        else:
            selection = db.select(round, bucket, rng)
            context = PromptContext(op, campaign, round, "mutate", selection.parent, selection.inspirations)
        mine = [p for p in db.programs.values() if p.campaign_id == campaign.campaign_id and p.timings]
        if mine:
            latest = max(mine, key=lambda p: p.round)
            context.incumbent_timings, context.hardware_name = latest.timings, latest.hardware_name
            context.hardware = latest.hardware
        context.programs = db.programs
        return LLMStrategy(client, context, record, rng, tracer)

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
        programs = await store()
        if await programs.record(result) is None:
            return  # not one of ours (a hand-published result, or a variant from another tool)
        await settle_reward(programs, result)

    async def settle_reward(programs: ProgramStore, result: BenchResult) -> None:
        """Once every variant of a round has its verdict, credit the round's strategy with its gain."""
        campaign_id = result.campaign.campaign_id
        rounds = (await programs.campaign(campaign_id)).rounds
        done = rounds.get(result.round)
        if done is None or done.rewarded:
            return
        db = await programs.load(result.campaign.key)
        judged = [db.programs[v] for v in done.variant_ids if v in db.programs and db.programs[v].status != "pending"]
        if len(judged) < len(done.variant_ids):
            return
        best_after = max([done.best_before] + [p.fitness for p in judged if p.fitness is not None])
        value = reward(done.best_before, best_after)
        claimed = []

        def claim(r) -> None:
            claimed.clear()
            if result.round in r.rounds and not r.rounds[result.round].rewarded:
                r.rounds[result.round].rewarded = True
                claimed.append(True)

        await programs.update_campaign(campaign_id, claim)
        if not claimed:
            return  # another delivery credited it first
        op = result.campaign.key.op
        await programs.update_json(bandit_key(op), lambda d: _credited(d, done.arm, value))
        with tracer.start_as_current_span("bandit.reward", attributes={
                "campaign_id": campaign_id, "op": op, "round": result.round, "strategy": done.arm,
                "reward": value, "best_before": done.best_before, "best_after": best_after}):
            log.info("campaign %s round %d: strategy %s earned %.3f", campaign_id, result.round, done.arm, value)

    return app


def bandit_key(op: str) -> str:
    return f"bandit.{op}"


def round_(x: float) -> float:
    return float(f"{x:.4g}")


def _pulled(data: dict | None, arm: str) -> dict:
    bandit = Bandit.from_dict(data)
    bandit.pull(arm)
    return bandit.to_dict()


def _credited(data: dict | None, arm: str, value: float) -> dict:
    bandit = Bandit.from_dict(data)
    bandit.credit(arm, value)
    return bandit.to_dict()


def replay(db: ProgramDatabase, campaign: Campaign, round: int, done: RoundRecord) -> list[VariantReady]:
    """The variants a round already published, rebuilt with their event ids (JetStream drops them)."""
    programs = [db.programs[v] for v in done.variant_ids if v in db.programs]
    return [VariantReady(event_id=variant_event_id(campaign.campaign_id, round, p.variant_id), campaign=campaign,
                         variant_id=p.variant_id, source=p.source, params=p.params, strategy=p.strategy,
                         parents=p.parents, round=round, round_size=len(programs)) for p in programs]
