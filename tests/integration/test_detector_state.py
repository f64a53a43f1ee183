"""The detector's state over a real nats-server: a restart mid-stream rebuilds the profile from the
stream (no second announcement, no lost shapes), a key with a campaign in flight gets no second
one, and a change below the minimum expected gain starts nothing."""
import asyncio
from datetime import datetime, timedelta, timezone

import nats
import pytest
from nats.js.api import KeyValueConfig

from detector.app import build_app
from detector.change import ChangeDetector
from detector.inflight import CampaignGuard
from detector.replay import replay
from shared import subjects
from shared.registry import campaign_key
from shared.schemas import (CampaignState, Hypothesis, KernelKey, KernelStats, ShapeCount, UsageChanged,
                            UsageSnapshot, WeightedShape)
from shared.settings import Settings

pytestmark = pytest.mark.nats

DECODE = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h512-r16")
PREFILL = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h512-r4k")
T0 = datetime.now(timezone.utc)  # set per test below: the replay reaches back from the test's own now


@pytest.fixture(autouse=True)
def _recent_windows():
    """Windows from a few minutes before each test, so the replay (which reaches back
    KERNELLOOP_DETECTOR_REPLAY_S from now) finds them however late in a long run the test comes."""
    global T0
    T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)


def stats(key: KernelKey, slot: int, calls: int, us: float, shape: list[int], variant_id=None) -> KernelStats:
    return KernelStats(key=key, source="host:7", window_start=T0 + timedelta(seconds=5 * slot), window_s=5.0,
                       calls=calls, shapes=[ShapeCount(shape=shape, calls=calls)], sampled_calls=calls // 8,
                       sampled_time_us=calls // 8 * us, variant_id=variant_id)


def traffic(slots: range, prefill_shape=(2048, 512)) -> list[KernelStats]:
    out = []
    for slot in slots:
        out.append(stats(DECODE, slot, 800, 20.0, [8, 512], variant_id="v-decode"))
        if slot >= 4:  # prefill arrives and takes half of the op's time
            out.append(stats(PREFILL, slot, 40, 400.0, list(prefill_shape)))
    return out


async def publish_raw(js, subject: str, event) -> None:
    await js.publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})


def settings(nats_url: str, **kw) -> Settings:
    return Settings(NATS_URL=nats_url, KERNELLOOP_WINDOW_S=5.0, KERNELLOOP_CONFIRM_WINDOWS=2,
                    KERNELLOOP_MIN_TIME_SHARE=0.1, KERNELLOOP_ROUNDS=2, KERNELLOOP_VARIANTS_PER_ROUND=3, **kw)


async def settled(js, *subjects_: str) -> None:
    """Wait until the detector's consumers of these subjects have handled everything published."""
    for subject in subjects_:
        for _ in range(200):
            info = await js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subject])
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)


async def drain(sub, timeout: float = 0.5) -> list:
    out = []
    while True:
        try:
            out += await sub.fetch(10, timeout=timeout)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nats-py raises either
            return out


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def test_replay_rebuilds_the_same_profile_as_the_live_stream(js, nats_url):
    app = build_app(settings(nats_url))  # declares the stream
    async with app.broker:
        await app.broker.start()
    windows = traffic(range(12))
    live = ChangeDetector(min_time_share=0.1, slot_s=5.0)
    for w in windows:
        live.observe(w)
        await publish_raw(js, subjects.KERNEL_STATS, w)

    rebuilt = ChangeDetector(min_time_share=0.1, slot_s=5.0)
    done = await replay(js, rebuilt, T0 - timedelta(seconds=1))
    assert done.windows == len(windows) and done.last_seq == len(windows)
    for key in (DECODE, PREFILL):
        assert rebuilt.snapshot(key) == live.snapshot(key)
        assert rebuilt.profile(key) == live.profile(key)
    # a replay that starts later sees only the later windows
    late = ChangeDetector(min_time_share=0.1, slot_s=5.0)
    assert (await replay(js, late, datetime.now(timezone.utc) + timedelta(seconds=5))).windows == 0
    # and one that stops at a sequence sees only what came before it
    early = ChangeDetector(min_time_share=0.1, slot_s=5.0)
    assert (await replay(js, early, T0 - timedelta(seconds=1), before_seq=5)).windows == 4


async def test_restarted_detector_keeps_its_profile_and_does_not_announce_again(js, nats_url):
    first = build_app(settings(nats_url))
    async with first.broker:
        await first.broker.start()
        changed = await js.pull_subscribe(subjects.USAGE_CHANGED, stream=subjects.STREAM_NAME)
        hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
        for w in traffic(range(10)):
            await publish_raw(js, subjects.KERNEL_STATS, w)
        (announced,) = [UsageChanged.model_validate_json(m.data) for m in await drain(changed)]
        assert announced.key == PREFILL and announced.reason == "new_shape"
        await drain(hypotheses, timeout=1.0)

    # a new process: everything it knows comes from the stream
    second = build_app(settings(nats_url))
    async with second.broker:
        await second.broker.start()
        for w in traffic(range(10, 20), prefill_shape=(4096, 512)):
            await publish_raw(js, subjects.KERNEL_STATS, w)
        await settled(js, subjects.KERNEL_STATS)
        assert await drain(changed) == [], "a restarted detector must not announce the bucket again"

        # its profile spans both processes' windows: 6 windows of 2048 rows, 10 of 4096
        await publish_raw(js, subjects.USAGE_CHANGED, UsageChanged(key=PREFILL, reason="manual"))
        (msg,) = await hypotheses.fetch(1, timeout=20)
        profile = {tuple(w.shape): w.weight for w in Hypothesis.model_validate_json(msg.data).campaign.profile}
        assert profile == pytest.approx({(4096, 512): 10 / 16, (2048, 512): 6 / 16})

    # restarted again, and asked for a campaign before any new window comes: the same profile
    third = build_app(settings(nats_url))
    async with third.broker:
        await third.broker.start()
        await publish_raw(js, subjects.USAGE_CHANGED, UsageChanged(key=PREFILL, reason="manual"))
        (msg,) = await hypotheses.fetch(1, timeout=20)
        again = {tuple(w.shape): w.weight for w in Hypothesis.model_validate_json(msg.data).campaign.profile}
        assert again == pytest.approx(profile)


async def test_no_second_campaign_for_a_key_while_one_is_in_flight(js, nats_url):
    app = build_app(settings(nats_url))
    async with app.broker:
        await app.broker.start()
        hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
        profile = [WeightedShape(shape=[2048, 512], weight=1.0)]

        def change() -> UsageChanged:
            return UsageChanged(key=PREFILL, reason="frequency_shift", profile=profile,
                                after=UsageSnapshot(windows=2, calls=80, time_share=0.5))

        await publish_raw(js, subjects.USAGE_CHANGED, change())
        (msg,) = await hypotheses.fetch(1, timeout=20)
        campaign = Hypothesis.model_validate_json(msg.data).campaign

        # the deployer has the campaign running: a second change for the key starts nothing
        campaigns = await js.create_key_value(KeyValueConfig(bucket=subjects.CAMPAIGN_BUCKET,
                                                             history=subjects.CAMPAIGN_HISTORY))
        await campaigns.put(campaign_key(campaign.campaign_id),
                            CampaignState(campaign=campaign, status="running").model_dump_json().encode())
        await publish_raw(js, subjects.USAGE_CHANGED, change())
        await settled(js, subjects.USAGE_CHANGED)
        assert await drain(hypotheses) == []

        # a person may still start one by hand
        manual = UsageChanged(key=PREFILL, reason="manual", profile=profile)
        await publish_raw(js, subjects.USAGE_CHANGED, manual)
        (msg,) = await hypotheses.fetch(1, timeout=20)
        assert msg.headers["Nats-Msg-Id"] == f"hypothesis-{manual.event_id}"
        campaign = Hypothesis.model_validate_json(msg.data).campaign

        # once it is over, the next change may start one
        await campaigns.put(campaign_key(campaign.campaign_id),
                            CampaignState(campaign=campaign, status="deployed").model_dump_json().encode())
        third = change()
        await publish_raw(js, subjects.USAGE_CHANGED, third)
        (msg,) = await hypotheses.fetch(1, timeout=20)
        assert msg.headers["Nats-Msg-Id"] == f"hypothesis-{third.event_id}"


async def test_change_below_the_minimum_expected_gain_starts_no_campaign(js, nats_url):
    app = build_app(settings(nats_url, KERNELLOOP_MIN_EXPECTED_GAIN=0.6))
    async with app.broker:
        await app.broker.start()
        hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
        for w in traffic(range(10)):  # prefill at half of the time: a gain of at most 50 %
            await publish_raw(js, subjects.KERNEL_STATS, w)
        await settled(js, subjects.KERNEL_STATS, subjects.USAGE_CHANGED)
        changed = await js.pull_subscribe(subjects.USAGE_CHANGED, stream=subjects.STREAM_NAME)
        assert len(await drain(changed)) == 1, "the change was detected"
        assert await drain(hypotheses) == [], "but judged not worth a campaign"


async def test_a_campaign_without_a_verdict_stops_blocking_its_key_after_the_timeout(js, nats_url):
    app = build_app(settings(nats_url))
    async with app.broker:
        guard = CampaignGuard(await app.broker.key_value(subjects.DETECTOR_BUCKET, history=subjects.DETECTOR_HISTORY),
                              await app.broker.key_value(subjects.CAMPAIGN_BUCKET, history=subjects.CAMPAIGN_HISTORY),
                              timeout_s=600)
        start = datetime.now(timezone.utc)
        assert (await guard.claim(str(PREFILL), "c-1", "e-1", now=start)).granted
        held = await guard.claim(str(PREFILL), "c-2", "e-2", now=start + timedelta(seconds=60))
        assert not held.granted and "c-1" in held.reason and "no verdict yet" in held.reason
        assert (await guard.claim(str(PREFILL), "c-1", "e-1", now=start + timedelta(seconds=60))).granted  # redelivery
        assert (await guard.claim(str(PREFILL), "c-3", "e-3", now=start + timedelta(seconds=601))).granted
