"""A campaign's rounds, without the broker: a bandit per op picks the round's strategy among those
that can run, the next best strategy takes the round when the chosen one proposes nothing, the
programs and the round go into the program database, and once every verdict of a round is in, the
strategy that ran it is credited with the gain it brought."""
import asyncio
import json
import math
import random
from types import ModuleType
from typing import NamedTuple

from opentelemetry.trace import INVALID_SPAN, Span, Tracer

from generator.bandit import Bandit, reward
from generator.database import CampaignRecord, Program, ProgramDatabase, ProgramStore, RoundRecord
from generator.evolve import LLMStrategy, ParamCrossover, crossover_parents, has_template
from generator.llm import LLMClient
from generator.prompts import PromptContext
from generator.search import propose_round, variant_event_id
from shared.schemas import BenchResult, Campaign, Failure, Scored, VariantReady

ARMS = ("params", "llm", "crossover")


class Reward(NamedTuple):
    """What a settled round earned its strategy."""

    campaign_id: str
    op: str
    round: int
    arm: str
    value: float
    best_before: float
    best_after: float


class Rounds:
    """Rounds over one program store; `allowed` are the strategies this generator may choose from,
    `client` the LLM (None: no LLM strategy can run)."""

    def __init__(self, programs: ProgramStore, client: LLMClient | None, allowed: list[str], tracer: Tracer):
        self.programs, self.client, self.allowed, self.tracer = programs, client, allowed, tracer

    async def variants(self, op: ModuleType, campaign: Campaign, round: int, tried: set[str], best: list[Scored],
                       failures: list[Failure] = (), span: Span = INVALID_SPAN) -> list[VariantReady]:
        """The round's variants: those it published before when it already ran (a redelivery: the
        same variants again, de-duplicated by id), else a new round's."""
        db = await self.programs.load(campaign.key)
        db.learn(failures, best)  # the refine may overtake our own consumer of bench.result
        record = await self.programs.campaign(campaign.campaign_id)
        if round in record.rounds:
            ready = replay(db, campaign, round, record.rounds[round])
            span.set_attributes({"strategy": record.rounds[round].arm, "variants": len(ready), "replayed": True})
            return ready
        tried = tried | {p.variant_id for p in db.programs.values() if p.campaign_id == campaign.campaign_id}
        # an LLM round takes minutes; shared.broker's heartbeats keep the message meanwhile
        return await self.propose(op, campaign, round, tried, best, db, span)

    async def propose(self, op: ModuleType, campaign: Campaign, round: int, tried: set[str], best: list[Scored],
                      db: ProgramDatabase, span: Span = INVALID_SPAN) -> list[VariantReady]:
        """Choose the round's strategy, run it off the event loop, store the programs and the round."""
        bandit = Bandit.from_dict(await self.programs.get_json(bandit_key(campaign.key.op)))
        record = await self.programs.campaign(campaign.campaign_id)
        rng = random.Random(f"{campaign.campaign_id}:{round}:strategy")
        crossover = crossover_parents(op, best, db, campaign.key.bucket)
        arms = runnable(self.allowed, op, self.client is not None, crossover)
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
            strategy = self.strategy(candidate_arm, op, campaign, round, db, record, crossover)
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
        await self.programs.save(campaign.key, new + [db.programs[vid] for vid, _ in moved])

        def remember(r: CampaignRecord) -> None:
            r.tokens_used, r.llm_calls = max(r.tokens_used, record.tokens_used), max(r.llm_calls, record.llm_calls)
            r.cost_usd = max(r.cost_usd, record.cost_usd)
            r.attempts = record.attempts
            if ready:
                r.rounds[round] = RoundRecord(arm=used, variant_ids=[v.variant_id for v in ready],
                                              best_before=best_before)

        await self.programs.update_campaign(campaign.campaign_id, remember)
        if ready:
            await self.programs.update_json(bandit_key(campaign.key.op), lambda d: _pulled(d, used))
        return ready

    def strategy(self, arm: str, op: ModuleType, campaign: Campaign, round: int, db: ProgramDatabase,
                 record: CampaignRecord, crossover: str | None):
        """What search.propose_round runs for an arm: "params", a ParamCrossover or an LLMStrategy."""
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
        return LLMStrategy(self.client, context, record, rng, self.tracer)

    async def record(self, result: BenchResult) -> Reward | None:
        """Store a verdict; when it completes its round, credit the round's strategy with its gain.
        None when there is nothing to credit (yet)."""
        if await self.programs.record(result) is None:
            return None  # not one of ours (a hand-published result, or a variant from another tool)
        return await self.settle(result)

    async def settle(self, result: BenchResult) -> Reward | None:
        """Once every variant of a round has its verdict, credit the round's strategy with its gain,
        once across redeliveries and replicas."""
        campaign_id = result.campaign.campaign_id
        rounds = (await self.programs.campaign(campaign_id)).rounds
        done = rounds.get(result.round)
        if done is None or done.rewarded:
            return None
        db = await self.programs.load(result.campaign.key)
        judged = [db.programs[v] for v in done.variant_ids if v in db.programs and db.programs[v].status != "pending"]
        if len(judged) < len(done.variant_ids):
            return None
        best_after = max([done.best_before] + [p.fitness for p in judged if p.fitness is not None])
        value = reward(done.best_before, best_after)
        claimed = []

        def claim(r: CampaignRecord) -> None:
            claimed.clear()
            if result.round in r.rounds and not r.rounds[result.round].rewarded:
                r.rounds[result.round].rewarded = True
                claimed.append(True)

        await self.programs.update_campaign(campaign_id, claim)
        if not claimed:
            return None  # another delivery credited it first
        op = result.campaign.key.op
        await self.programs.update_json(bandit_key(op), lambda d: _credited(d, done.arm, value))
        return Reward(campaign_id, op, result.round, done.arm, value, done.best_before, best_after)


def runnable(allowed: list[str], op: ModuleType, llm: bool, crossover: str | None) -> list[str]:
    """The allowed strategies that can run a round of op: parameter search needs a template, the
    LLM a client, crossover two parents of a kind it can combine (crossover_parents)."""
    return [a for a in allowed if (a != "params" or has_template(op)) and (a != "llm" or llm)
            and (a != "crossover" or crossover == "params" or (crossover == "llm" and llm))]


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
