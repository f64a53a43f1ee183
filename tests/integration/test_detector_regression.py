"""A deploy that serves slower than what it replaced, end to end over a real nats-server: the detector
sees the live time per call rise after the variant changed and raises usage.changed (regression,
after_deploy); the deployer rolls the registry back and announces it with a Deploy(rollback=True);
no campaign starts for it."""
import asyncio
from datetime import datetime, timedelta, timezone

import nats
import pytest

from deployer.app import build_app as build_deployer
from deployer.regression import ROLLBACK_BY, answer_regression
from detector.app import build_app as build_detector
from shared import subjects
from shared.ops import get_op
from shared.registry import Registry
from shared.schemas import Deploy, KernelKey, KernelStats, RegistryEntry, ShapeCount, UsageChanged
from shared.settings import Settings
from shared.variants import render, variant_id

pytestmark = pytest.mark.nats

OP = get_op("rmsnorm")
KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
T0 = datetime.now(timezone.utc)  # set per test below: the replay reaches back from the test's own now


@pytest.fixture(autouse=True)
def _recent_windows():
    """Windows from a few minutes before each test, so the replay (which reaches back
    KERNELLOOP_DETECTOR_REPLAY_S from now) finds them however late in a long run the test comes."""
    global T0
    T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=2)
NOISE = (1.0, 1.1, 0.92, 1.05, 0.97, 1.08, 0.94, 1.02)  # a fixed ~6 % wobble


def entry(block: int, campaign_id: str, previous: str | None) -> RegistryEntry:
    params = {**OP.DEFAULT, "BLOCK": block}
    source = render(OP.TEMPLATE, params)
    return RegistryEntry(variant_id=variant_id(source, params), source=source, params=params, speedup=1.3,
                         campaign_id=campaign_id, approved_by="auto-gate", previous_variant_id=previous)


def window(slot: int, us: float, variant: str) -> KernelStats:
    calls = round(400 * NOISE[slot % len(NOISE)])
    per_call = us * NOISE[(slot * 3) % len(NOISE)]
    return KernelStats(key=KEY, source="host:1", window_start=T0 + timedelta(seconds=5 * slot), window_s=5.0,
                       calls=calls, shapes=[ShapeCount(shape=[16, 1024], calls=calls)], sampled_calls=calls // 8,
                       sampled_time_us=calls // 8 * per_call, variant_id=variant)


async def test_live_regression_after_a_deploy_is_rolled_back(nats_url, tmp_path):
    settings = Settings(NATS_URL=nats_url, KERNELLOOP_WINDOW_S=5.0, KERNELLOOP_STATE_DIR=str(tmp_path))
    detector, deployer = build_detector(settings), build_deployer(settings)
    async with detector.broker, deployer.broker:
        await detector.broker.start()
        await deployer.broker.start()
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            registry = await Registry.open(deployer.broker)
            old = entry(512, "c-old", None)
            first = await registry.write(KEY, old, None)
            new = entry(1024, "c-new", old.variant_id)  # the benchmark promised 1.3x
            await registry.write(KEY, new, first)
            changed = await js.pull_subscribe(subjects.USAGE_CHANGED, stream=subjects.STREAM_NAME)
            deploys = await js.pull_subscribe(subjects.DEPLOY, stream=subjects.STREAM_NAME)
            hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)

            # 12 windows on the old variant at 100 us, then the new one serves at 250 us
            for slot in range(20):
                w = window(slot, 100.0, old.variant_id) if slot < 12 else window(slot, 250.0, new.variant_id)
                await js.publish(subjects.KERNEL_STATS, w.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": w.event_id})

            (msg,) = await changed.fetch(1, timeout=20)
            event = UsageChanged.model_validate_json(msg.data)
            assert event.reason == "regression" and event.after_deploy and event.variant_id == new.variant_id
            assert "the benchmark promised" in event.detail and "1.30x" in event.detail

            (msg,) = await deploys.fetch(1, timeout=20)
            rollback = Deploy.model_validate_json(msg.data)
            assert rollback.rollback and rollback.variant_id == old.variant_id
            assert rollback.previous_variant_id == new.variant_id and rollback.approved_by == ROLLBACK_BY
            serving = await registry.read(KEY)
            assert serving.entry.variant_id == old.variant_id and serving.revision == rollback.revision

            with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
                await hypotheses.fetch(1, timeout=2)  # the rollback is the answer, not a campaign

            # the same event again (a redelivery): the regressed variant no longer serves, nothing to do
            assert await answer_regression(deployer.broker, registry, event) is None
            assert (await registry.read(KEY)).revision == rollback.revision
        finally:
            await nc.close()
