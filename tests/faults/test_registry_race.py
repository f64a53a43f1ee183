"""Two deployers race to deploy on one registry key. Writes name the revision they replace, so
exactly one wins; the loser re-reads the key, finds a new incumbent its winner was never measured
against, and stands down instead of deploying over it."""
import asyncio
import time

import nats
import pytest

from deployer.campaign import CampaignStore
from deployer.rollout import carry_out
from shared import subjects, supervisor
from shared.broker import STREAM_CONFIG, make_broker, publish
from shared.ops import get_op
from shared.registry import Registry, StaleRevision
from shared.schemas import BenchResult, Campaign, CampaignState, Deploy, Hardware, KernelKey, WeightedShape
from shared.variants import render, source_sha256, variant_id

pytestmark = pytest.mark.nats

OP = get_op("rmsnorm")
KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
HARDWARE = Hardware(key=KEY.hardware, name="CPU (Triton interpreter)", interpreter=True, torch="-", triton="-")


def winning_result(campaign_id: str, block: int) -> BenchResult:
    """A round of one candidate that clears the gate: its campaign closes on this result alone."""
    params = {**OP.DEFAULT, "BLOCK": block}
    source = render(OP.TEMPLATE, params)
    campaign = Campaign(campaign_id=campaign_id, key=KEY, profile=[WeightedShape(shape=[8, 1024], weight=1.0)])
    return BenchResult(event_id=f"result-{campaign_id}", campaign=campaign, variant_id=variant_id(source, params),
                       source=source,
                       measured_sha256=source_sha256(source), params=params, strategy="grid", round=0, round_size=1, status="ok",
                       weighted_speedup=1.5, speedup_ci_low=1.4, speedup_ci_high=1.6, hardware=HARDWARE)


def pending_deploy(result: BenchResult) -> CampaignState:
    return CampaignState(campaign=result.campaign, pending="deploy", winner=result, approved_by="auto-gate",
                         reason="deploy")


class ReadTogether(Registry):
    """The real registry, except that the first read waits until the other deployer has read too:
    both then hold the same revision, which is the race a write with the expected revision settles."""

    def __init__(self, kv, barrier: asyncio.Barrier):
        super().__init__(kv)
        self.barrier, self.stale = barrier, []

    async def read(self, key):
        current = await super().read(key)
        if self.barrier is not None:
            self.barrier, barrier = None, self.barrier
            await barrier.wait()
        return current

    async def write(self, key, entry, expected_revision):
        try:
            return await super().write(key, entry, expected_revision)
        except StaleRevision as e:
            self.stale.append(e)
            raise


async def test_deployers_that_read_the_same_revision_deploy_once_and_the_loser_stands_down(nats_url):
    # Two brokers, two connections: two deployers, as far as the server can tell.
    results = [winning_result("race-a", 1024), winning_result("race-b", 2048)]
    barrier = asyncio.Barrier(2)
    brokers = [make_broker(nats_url)[0] for _ in results]
    async with brokers[0], brokers[1]:
        for b in brokers:
            await b.connect()
        await brokers[0].connection.jetstream().add_stream(**STREAM_CONFIG)  # where `deploy` goes
        stores = [await CampaignStore.open(b) for b in brokers]
        registries = [ReadTogether((await Registry.open(b)).kv, barrier) for b in brokers]
        for store, result in zip(stores, results):
            await store.update(result.campaign.campaign_id, lambda _, r=result: (pending_deploy(r), None))
        outcomes = await asyncio.gather(*[
            carry_out(b, store, registry, pending_deploy(result))
            for b, store, registry, result in zip(brokers, stores, registries, results)])
        deploys = [o for o in outcomes if isinstance(o, Deploy)]
        assert len(deploys) == 1, outcomes
        winner = deploys[0]
        loser = next(r for r in results if r.campaign.campaign_id != winner.campaign_id)
        assert sum(len(r.stale) for r in registries) == 1, "exactly one write found the key changed under it"
        history = await registries[0].history(KEY)
        assert [h.entry.variant_id for h in history] == [winner.variant_id], "one registry revision"
        lost = await stores[0].get(loser.campaign.campaign_id)
        assert lost.status == "exhausted" and lost.pending is None
        assert winner.variant_id in lost.reason, "the loser names the new incumbent it was not measured against"
        won = await stores[0].get(winner.campaign_id)
        assert won.status == "deployed" and won.deployed_revision == history[0].revision


async def _campaign_states(nc, ids: list[str]) -> dict[str, CampaignState | None]:
    try:
        kv = await nc.jetstream().key_value(subjects.CAMPAIGN_BUCKET)
    except nats.js.errors.BucketNotFoundError:  # no deployer has recorded a result yet
        return dict.fromkeys(ids)
    states = {}
    for cid in ids:
        try:
            states[cid] = CampaignState.model_validate_json((await kv.get(cid)).value)
        except nats.js.errors.KeyNotFoundError:
            states[cid] = None
    return states


def _settled(states: dict[str, CampaignState | None]) -> bool:
    return all(s is not None and not s.pending and s.status != "running" for s in states.values())


async def _race(nats_url: str, loop: supervisor.Loop, results: list[BenchResult]) -> tuple:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 120
        # Both replicas are pulling from the deployer's one durable consumer before the results go out.
        while True:
            assert not loop.dead(), f"{loop.dead()} exited; see {loop.state_dir / 'logs'}"
            try:
                info = await js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subjects.BENCH_RESULT])
                if info.num_waiting >= 2:
                    break
            except nats.js.errors.NotFoundError:
                pass
            assert time.monotonic() < deadline, "two deployers never pulled from their consumer"
            await asyncio.sleep(0.2)
        broker = make_broker(nats_url)[0]
        async with broker:
            await broker.connect()
            await asyncio.gather(*[publish(broker, subjects.BENCH_RESULT, r) for r in results])
        ids = [r.campaign.campaign_id for r in results]
        deadline = time.monotonic() + 120
        while not _settled(states := await _campaign_states(nc, ids)):
            assert not loop.dead(), f"{loop.dead()} exited; see {loop.state_dir / 'logs'}"
            assert time.monotonic() < deadline, f"the deployers did not settle both campaigns: {states}"
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # a second deploy, were there one, would land now
        history = await (await js.key_value(subjects.REGISTRY_BUCKET)).history(str(KEY))
        info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=subjects.DEPLOY)
        return states, history, (info.state.subjects or {}).get(subjects.DEPLOY, 0)
    finally:
        await nc.close()


@pytest.mark.e2e
def test_two_deployer_processes_on_one_key_deploy_exactly_once(nats_url, tmp_path):
    loop = supervisor.start(tmp_path, nats_url=nats_url, services=("deployer",))
    try:
        loop.add_replica("deployer")
        results = [winning_result("proc-a", 1024), winning_result("proc-b", 2048)]
        states, history, deploys = asyncio.run(_race(nats_url, loop, results))
    finally:
        loop.stop()
    assert deploys == 1, "one deploy event"
    assert len(history) == 1, "one registry revision"
    won = [s for s in states.values() if s.status == "deployed"]
    lost = [s for s in states.values() if s.status != "deployed"]
    assert len(won) == 1 and len(lost) == 1, states
    assert history[0].revision == won[0].deployed_revision
    assert lost[0].status == "exhausted" and won[0].winner.variant_id in lost[0].reason, lost[0].reason
