"""A campaign's rounds (generator/rounds.py) over a real JetStream KV bucket: the bandit's
choice among the strategies that can run, the fallback when the chosen one proposes nothing, a
redelivered round republished as it was, and the reward settled once per round when its last
verdict arrives."""
import asyncio
import types

import nats
import pytest
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from generator.bandit import Bandit
from generator.database import ProgramDatabase, ProgramStore
from generator.llm import LLMClient, LLMConfig, ModelChoice
from generator.rounds import Rounds, bandit_key, runnable
from shared import subjects
from shared.hardware import fingerprint
from shared.ops import rmsnorm
from shared.schemas import (BenchResult, Budget, Campaign, KernelKey, Scored, ShapeTiming, VariantReady,
                            WeightedShape)
from shared.variants import render, source_sha256, variant_id
from support import rmsnorm_answers as answers
from support.llm_server import ScriptedLLM, answer

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
PER_ROUND = 2


def campaign(campaign_id: str = "rounds-1") -> Campaign:
    return Campaign(campaign_id=campaign_id, key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                    budget=Budget(rounds=3, variants_per_round=PER_ROUND))


def llm_client(url: str) -> LLMClient:
    return LLMClient(LLMConfig(base_url=url, api_key="test", models=[ModelChoice("model-a", 1.0)], timeout_s=5.0,
                               retries=0, backoff_s=0.01, max_tokens=1000, token_budget=100_000))


def result(v: VariantReady, status: str, low: float | None = None) -> BenchResult:
    timings = [ShapeTiming(shape=[16, 1024], weight=1.0, candidate_us=50.0, candidate_spread_us=1.0,
                           incumbent_us=100.0, incumbent_spread_us=1.0, speedup=2.0)] if low else []
    return BenchResult(campaign=v.campaign, variant_id=v.variant_id, source=v.source,
                       measured_sha256=source_sha256(v.source), strategy=v.strategy, round=v.round,
                       round_size=v.round_size, status=status, error=None if low else "wrong answer",
                       timings=timings, weighted_speedup=low and low + 0.1, speedup_ci_low=low, hardware=fingerprint())


def scored(params: dict, low: float) -> Scored:
    return Scored(variant_id=variant_id(render(rmsnorm.TEMPLATE, params), params), params=params,
                  weighted_speedup=low + 0.1, speedup_ci_low=low)


@pytest.fixture
async def bucket(nats_url):
    """Opens a program bucket, as ProgramStore.open declares it, on the test's own server; a second
    name gives a second store."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def open_bucket(name: str = subjects.PROGRAM_BUCKET) -> KeyValue:
        return await js.create_key_value(KeyValueConfig(bucket=name, history=subjects.PROGRAM_HISTORY))

    try:
        yield open_bucket
    finally:
        await nc.close()


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


async def bandit_of(store: ProgramStore) -> Bandit:
    return Bandit.from_dict(await store.get_json(bandit_key("rmsnorm")))


async def test_round_falls_back_to_params_when_llm_proposes_nothing(bucket, spans):
    tracer, exporter = spans
    store = ProgramStore(await bucket())
    with ScriptedLLM([answer(answers.PROSE)], repeat_last=True) as llm:
        rounds = Rounds(store, llm_client(llm.base_url), ["llm", "params"], tracer)
        with tracer.start_as_current_span("generate") as span:
            ready = await rounds.variants(rmsnorm, campaign(), 0, set(), [], span=span)
    assert len(ready) == PER_ROUND and all(v.strategy == "grid" for v in ready)
    assert llm.requests, "the bandit's first choice (the untried LLM) was asked first"
    record = await store.campaign("rounds-1")
    assert record.rounds[0].arm == "params" and record.rounds[0].variant_ids == [v.variant_id for v in ready]
    assert record.llm_calls == len(llm.requests), "the calls the LLM round spent are remembered all the same"
    assert (await bandit_of(store)).pulls == {"params": 1}, "the strategy that ran the round is the one pulled"
    [generate] = [s for s in exporter.get_finished_spans() if s.name == "generate"]
    assert (generate.attributes["strategy"], generate.attributes["strategy_fallback"]) == ("llm", "params")
    assert [e.attributes["strategy"] for e in generate.events if e.name == "strategy gave nothing"] == ["llm"]


async def test_round_goes_to_the_strategy_that_paid_for_the_op(bucket, spans):
    store = ProgramStore(await bucket())
    await store.update_json(bandit_key("rmsnorm"), lambda _: {"pulls": {"params": 4, "crossover": 4},
                                                              "total": {"params": 0.0, "crossover": 1.2}})
    best = [scored({"BLOCK": 1024, "ROWS": 2, "num_warps": 4}, 1.3), scored({"BLOCK": 512, "ROWS": 4, "num_warps": 8}, 1.2)]
    ready = await Rounds(store, None, ["params", "crossover"], spans[0]).variants(rmsnorm, campaign(), 1, set(), best)
    assert len(ready) == PER_ROUND
    assert all(v.strategy == "evolve" and sorted(v.parents) == sorted(b.variant_id for b in best) for v in ready)
    assert (await store.campaign("rounds-1")).rounds[1].arm == "crossover"
    assert (await bandit_of(store)).pulls == {"params": 4, "crossover": 5}


async def test_round_without_a_runnable_strategy_proposes_nothing_and_records_no_round(bucket, spans):
    store = ProgramStore(await bucket())
    assert await Rounds(store, None, ["llm"], spans[0]).variants(rmsnorm, campaign(), 0, set(), []) == []
    assert (await store.campaign("rounds-1")).rounds == {}
    assert await store.get_json(bandit_key("rmsnorm")) is None


def test_only_strategies_that_can_run_are_offered_to_the_bandit():
    everything = ["params", "llm", "crossover"]
    assert runnable(everything, rmsnorm, llm=True, crossover=None) == ["params", "llm"]
    assert runnable(everything, rmsnorm, llm=False, crossover="llm") == ["params"]  # LLM crossover needs the LLM
    assert runnable(everything, rmsnorm, llm=False, crossover="params") == ["params", "crossover"]
    no_template = types.SimpleNamespace(NAME="custom")
    assert runnable(everything, no_template, llm=True, crossover="llm") == ["llm", "crossover"]
    assert runnable(everything, no_template, llm=False, crossover=None) == []


async def test_redelivered_round_republishes_the_same_variants_without_choosing_again(bucket, spans):
    store = ProgramStore(await bucket())
    rounds = Rounds(store, None, ["params"], spans[0])
    first = await rounds.variants(rmsnorm, campaign(), 0, set(), [])
    again = await rounds.variants(rmsnorm, campaign(), 0, set(), [])
    assert [(v.event_id, v.variant_id, v.source, v.round_size) for v in again] == \
           [(v.event_id, v.variant_id, v.source, v.round_size) for v in first]
    assert (await bandit_of(store)).pulls == {"params": 1}


async def test_next_round_never_proposes_what_the_campaign_already_tried(bucket, spans):
    store = ProgramStore(await bucket())
    rounds = Rounds(store, None, ["params"], spans[0])
    round0 = await rounds.variants(rmsnorm, campaign(), 0, set(), [])
    round1 = await rounds.variants(rmsnorm, campaign(), 1, set(), [])  # a refine that names nothing tried
    assert len(round1) == PER_ROUND
    assert not {v.variant_id for v in round0} & {v.variant_id for v in round1}
    db: ProgramDatabase = await store.load(KEY)
    assert {db.programs[v.variant_id].round for v in round1} == {1}


async def test_round_reward_is_credited_once_when_its_last_verdict_arrives(bucket, spans):
    store = ProgramStore(await bucket())
    rounds = Rounds(store, None, ["params"], spans[0])
    first, second = await rounds.variants(rmsnorm, campaign(), 0, set(), [])
    assert await rounds.record(result(first, "incorrect")) is None, "a verdict is still missing"
    earned = await rounds.record(result(second, "ok", low=1.5))
    assert (earned.campaign_id, earned.op, earned.round, earned.arm) == ("rounds-1", "rmsnorm", 0, "params")
    assert (earned.best_before, earned.best_after) == (1.0, 1.5) and earned.value == pytest.approx(0.5)
    assert await rounds.record(result(second, "ok", low=1.5)) is None, "a redelivery credits nothing more"
    bandit = await bandit_of(store)
    assert bandit.pulls == {"params": 1} and bandit.total == {"params": pytest.approx(0.5)}


async def test_two_deliveries_of_the_last_verdict_at_once_credit_the_round_once(bucket, spans):
    store = ProgramStore(await bucket())
    rounds = Rounds(store, None, ["params"], spans[0])
    first, second = await rounds.variants(rmsnorm, campaign(), 0, set(), [])
    await rounds.record(result(first, "ok", low=1.1))
    last = result(second, "ok", low=1.5)
    earned = await asyncio.gather(rounds.record(last), rounds.record(last))  # a redelivery racing the first
    assert [e.value for e in earned if e is not None] == [pytest.approx(0.5)]
    assert (await bandit_of(store)).total == {"params": pytest.approx(0.5)}


async def test_round_that_beats_nothing_earns_zero(bucket, spans):
    store = ProgramStore(await bucket())
    rounds = Rounds(store, None, ["params"], spans[0])
    best = [scored({"BLOCK": 1024, "ROWS": 2, "num_warps": 4}, 1.4)]
    first, second = await rounds.variants(rmsnorm, campaign(), 1, set(), best)
    await rounds.record(result(first, "ok", low=1.2))
    earned = await rounds.record(result(second, "ok", low=1.3))
    assert (earned.best_before, earned.best_after, earned.value) == (1.4, 1.4, 0.0)


async def test_result_for_a_variant_it_never_proposed_earns_nothing(bucket, spans):
    store = ProgramStore(await bucket())
    rounds = Rounds(store, None, ["params"], spans[0])
    [foreign] = await Rounds(ProgramStore(await bucket("elsewhere")), None, ["params"], spans[0]).variants(
        rmsnorm, campaign("elsewhere").model_copy(update={"budget": Budget(rounds=1, variants_per_round=1)}),
        0, set(), [])
    assert await rounds.record(result(foreign, "ok", low=2.0)) is None
    assert await store.get_json(bandit_key("rmsnorm")) is None
