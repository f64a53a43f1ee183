"""The deployer service in-process against a real nats-server: a winning round becomes a `deploy`
and a registry entry, a losing round with rounds left a `refine`, a result re-published under a new
event id counts once, and a round held for approval deploys when a person approves."""
import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployer.app import build_app
from deployer.campaign import CampaignStore, record
from deployer.rollout import approve
from shared import subjects
from shared.broker import make_broker
from shared.hardware import fingerprint
from shared.ops import get_op
from shared.registry import Registry
from shared.schemas import BenchResult, Budget, Campaign, Deploy, KernelKey, Refine, RegistryEntry, WeightedShape
from shared.settings import Settings
from shared.variants import render, source_sha256, variant_id

pytestmark = pytest.mark.nats

OP = get_op("rmsnorm")
HARDWARE = fingerprint()
KEY = KernelKey(hardware=HARDWARE.key, op="rmsnorm", dtype="float32", bucket="h1024-r16")


def make_campaign(campaign_id: str) -> Campaign:
    return Campaign(campaign_id=campaign_id, key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                    budget=Budget(rounds=3, variants_per_round=3))


def bench(campaign: Campaign, block: int, speedup: float | None, low: float | None, high: float | None = None, *,
          round_size: int = 3, status: str = "ok", error: str | None = None) -> BenchResult:
    params = {**OP.DEFAULT, "BLOCK": block}
    source = render(OP.TEMPLATE, params)
    return BenchResult(campaign=campaign, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=0, round_size=round_size, status=status, error=error,
                       weighted_speedup=speedup, speedup_ci_low=low, speedup_ci_high=high, hardware=HARDWARE,
                       incumbent="rmsnorm baseline Triton kernel")


@dataclass
class Harness:
    js: nats.js.JetStreamContext
    broker: object  # a connected client broker, as a CLI would hold
    store: CampaignStore
    registry: Registry
    spans: InMemorySpanExporter

    async def send(self, result: BenchResult) -> int:
        ack = await self.js.publish(subjects.BENCH_RESULT, result.model_dump_json().encode(),
                                    headers={"Nats-Msg-Id": result.event_id})
        return ack.seq

    async def handled(self, seq: int, timeout: float = 20.0) -> None:
        """Until the deployer's durable consumer has acked the message at stream sequence seq."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subjects.BENCH_RESULT])
            if info.ack_floor.stream_seq >= seq and not info.num_ack_pending:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the deployer did not ack bench.result #{seq} within {timeout} s")

    async def count(self, subject: str) -> int:
        info = await self.js.stream_info(subjects.STREAM_NAME, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    async def last(self, subject: str, model):
        msg = await self.js.get_last_msg(subjects.STREAM_NAME, subject)
        return model.model_validate_json(msg.data)


@asynccontextmanager
async def running_deployer(nats_url, tmp_path, **env):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = build_app(Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=str(tmp_path), **env), provider)
    await app.start()
    client, _ = make_broker(nats_url)
    nc = await nats.connect(nats_url)
    try:
        async with client:
            await client.connect()
            yield Harness(nc.jetstream(), client, await CampaignStore.open(client), await Registry.open(client), spans)
    finally:
        await nc.close()
        await app.stop()


async def test_winning_round_publishes_deploy_and_writes_registry(nats_url, tmp_path):
    campaign = make_campaign("camp-win")
    fast = bench(campaign, 1024, 1.40, 1.30, 1.50)
    round_ = [bench(campaign, 256, 1.01, 0.96, 1.06), fast,
              bench(campaign, 2048, None, None, status="incorrect", error="max error 0.2 on [3, 1000]")]
    async with running_deployer(nats_url, tmp_path) as h:
        for r in round_:
            seq = await h.send(r)
        await h.handled(seq)
        assert await h.count(subjects.DEPLOY) == 1 and await h.count(subjects.REFINE) == 0
        deploy = await h.last(subjects.DEPLOY, Deploy)
        assert deploy.event_id == "deploy-camp-win" and deploy.key == KEY
        assert deploy.variant_id == fast.variant_id and deploy.previous_variant_id is None
        assert deploy.speedup == 1.40 and deploy.speedup_ci_low == 1.30 and deploy.approved_by == "auto-gate"
        assert len(deploy.trace_id) == 32 and int(deploy.trace_id, 16)

        current = await h.registry.read(KEY)
        assert current.revision == deploy.revision
        assert current.entry.variant_id == fast.variant_id and current.entry.source == fast.source
        assert current.entry.campaign_id == "camp-win" and current.entry.trace_id == deploy.trace_id
        state = await h.store.get("camp-win")
        assert state.status == "deployed" and state.deployed_revision == deploy.revision

        by_name = {s.name: s for s in h.spans.get_finished_spans() if s.name in ("decide", "deploy")}
        assert by_name["deploy"].attributes["variant_id"] == fast.variant_id
        assert by_name["deploy"].attributes["kernel_key"] == str(KEY)
        assert by_name["deploy"].attributes["speedup"] == 1.40
        assert by_name["decide"].attributes["campaign_id"] == "camp-win"
        assert f"{by_name['deploy'].context.trace_id:032x}" == deploy.trace_id


async def test_round_without_winner_and_rounds_left_publishes_refine(nats_url, tmp_path):
    campaign = make_campaign("camp-refine")
    noisy = bench(campaign, 1024, 1.08, 1.00, 1.16, round_size=2)  # faster median, inside the noise
    broken = bench(campaign, 8192, None, None, round_size=2, status="compile_error", error="out of resources")
    async with running_deployer(nats_url, tmp_path) as h:
        await h.send(noisy)
        await h.handled(await h.send(broken))
        assert await h.count(subjects.REFINE) == 1 and await h.count(subjects.DEPLOY) == 0
        refine = await h.last(subjects.REFINE, Refine)
        assert refine.event_id == "refine-camp-refine-1" and refine.round == 1 and refine.rounds_left == 2
        assert set(refine.tried) == {noisy.variant_id, broken.variant_id}
        assert [(f.variant_id, f.error) for f in refine.failures] == [(broken.variant_id, "out of resources")]
        assert [b.variant_id for b in refine.best] == [noisy.variant_id]
        assert await h.registry.read(KEY) is None
        state = await h.store.get("camp-refine")
        assert state.status == "running" and state.pending is None and state.rounds_done == 1


async def test_result_republished_with_new_event_id_is_counted_once(nats_url, tmp_path):
    campaign = make_campaign("camp-dup")
    first, second = bench(campaign, 256, 1.0, 0.9, round_size=2), bench(campaign, 512, 1.0, 0.9, round_size=2)
    async with running_deployer(nats_url, tmp_path) as h:
        await h.send(first)
        # The benchmarker ran the same variant again and published it under a fresh event id.
        await h.handled(await h.send(first.model_copy(update={"event_id": "second-publish"})))
        state = await h.store.get("camp-dup")
        assert list(state.results[0]) == [first.variant_id] and state.rounds_done == 0
        assert await h.count(subjects.REFINE) == 0
        await h.handled(await h.send(second))
        assert await h.count(subjects.REFINE) == 1
        assert sorted((await h.store.get("camp-dup")).tried) == sorted([first.variant_id, second.variant_id])


async def test_required_approval_holds_the_deploy_until_a_person_approves(nats_url, tmp_path):
    campaign = make_campaign("camp-approve")
    fast = bench(campaign, 1024, 1.5, 1.4, round_size=1)
    async with running_deployer(nats_url, tmp_path, KERNELLOOP_REQUIRE_APPROVAL=True) as h:
        await h.handled(await h.send(fast))
        assert (await h.store.get("camp-approve")).status == "awaiting_approval"
        assert await h.count(subjects.DEPLOY) == 0 and await h.registry.read(KEY) is None

        deploy = await approve(h.broker, "camp-approve", "alice")
        assert deploy.approved_by == "alice" and deploy.variant_id == fast.variant_id
        assert await h.count(subjects.DEPLOY) == 1
        current = await h.registry.read(KEY)
        assert current.entry.approved_by == "alice" and current.revision == deploy.revision
        assert (await h.store.get("camp-approve")).status == "deployed"
        with pytest.raises(ValueError, match="not awaiting approval"):
            await approve(h.broker, "camp-approve", "bob")


async def test_concurrent_replicas_never_lose_a_result(nats_url, tmp_path):
    campaign = make_campaign("camp-race")
    round_ = [bench(campaign, block, 1.0, 0.9, round_size=6) for block in (256, 512, 1024, 2048, 4096, 8192)]
    async with running_deployer(nats_url, tmp_path) as h:
        # Six replicas record one result each at the same moment, all reading the same revision.
        steps = await asyncio.gather(*(
            h.store.update("camp-race", lambda s, r=r: record(s, r, 0.02, False)) for r in round_))
        state = await h.store.get("camp-race")
        assert sorted(state.tried) == sorted(r.variant_id for r in round_)
        assert state.rounds_done == 1 and state.pending == "refine"
        assert sum(step.decision is not None for _, step in steps) == 1  # exactly one replica closed the round


async def test_winner_measured_against_a_replaced_incumbent_is_not_deployed(nats_url, tmp_path):
    campaign = make_campaign("camp-stale")  # measured against the fallback
    other = bench(make_campaign("camp-other"), 512, 1.2, 1.1)
    fast = bench(campaign, 1024, 1.5, 1.4, round_size=1)
    async with running_deployer(nats_url, tmp_path) as h:
        served = RegistryEntry(variant_id=other.variant_id, source=other.source, params=other.params, speedup=1.2,
                               campaign_id="camp-other", approved_by="auto-gate")
        revision = await h.registry.write(KEY, served, None)
        await h.handled(await h.send(fast))
        assert await h.count(subjects.DEPLOY) == 0
        assert (await h.registry.read(KEY)).revision == revision
        state = await h.store.get("camp-stale")
        assert state.status == "exhausted" and "no longer served" in state.reason
