"""The loop's metrics over a real nats-server: variants by status, campaigns and deploys counted as the
deployer handles results, and the benchmark queue measured from the benchmarkers' consumer."""
import asyncio
import time
from datetime import datetime, timedelta, timezone

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from deployer.app import build_app
from deployer.queue import benchmark_queue
from shared import subjects
from shared.broker import STREAM_CONFIG
from shared.schemas import (BenchResult, Budget, Campaign, Hardware, KernelKey, VariantReady, WeightedShape)
from shared.settings import Settings
from shared.variants import source_sha256, variant_id

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
HARDWARE = Hardware(key=KEY.hardware, name="cpu", interpreter=True, torch="test", triton="test")
CAMPAIGN = Campaign(campaign_id="camp-metrics", key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                    budget=Budget(rounds=1, variants_per_round=2))


def result(block: int, status: str, speedup: float | None) -> BenchResult:
    source, params = f"# BLOCK={block}\n", {"BLOCK": block}
    return BenchResult(campaign=CAMPAIGN, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=0, round_size=2, status=status, weighted_speedup=speedup,
                       speedup_ci_low=speedup and speedup - 0.1, speedup_ci_high=speedup and speedup + 0.1,
                       hardware=HARDWARE, error=None if status == "ok" else "max error 0.3")


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend((dict(p.attributes), p.value) for p in metric.data.data_points)
    return out


async def test_deployer_counts_variants_by_status_campaigns_and_deploys(nats_url, tmp_path):
    reader = InMemoryMetricReader()
    app = build_app(Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=str(tmp_path)),
                    meter_provider=MeterProvider(metric_readers=[reader]))
    await app.start()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for r in (result(1024, "ok", 1.5), result(2048, "incorrect", None)):
            await js.publish(subjects.BENCH_RESULT, r.model_dump_json().encode(), headers={"Nats-Msg-Id": r.event_id})
        deadline = time.monotonic() + 20
        while "kernelloop.deploys" not in points(reader):
            assert time.monotonic() < deadline, f"no deploy counted: {points(reader)}"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
        await app.stop()
    found = points(reader)
    variants = {p["status"]: v for p, v in found["kernelloop.variants"]}
    assert variants == {"ok": 1, "incorrect": 1}
    campaigns = {p["event"]: v for p, v in found["kernelloop.campaigns"]}
    assert campaigns == {"started": 1, "deployed": 1}
    assert found["kernelloop.deploys"] == [({"op": "rmsnorm", "approved_by": "gate"}, 1)]


async def test_benchmark_queue_counts_variants_waiting_and_the_oldest_ones_age(nats_url):
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(**STREAM_CONFIG)
        await js.add_consumer(subjects.STREAM_NAME, ConsumerConfig(
            durable_name=subjects.DURABLE[subjects.VARIANT_READY], filter_subject=subjects.VARIANT_READY,
            ack_policy=AckPolicy.EXPLICIT))
        assert await benchmark_queue(js) == (0, 0.0)
        for age_s, block in ((40, 1024), (5, 2048)):
            source, params = f"# BLOCK={block}\n", {"BLOCK": block}
            v = VariantReady(campaign=CAMPAIGN, variant_id=variant_id(source, params), source=source, params=params,
                             strategy="grid", round=0, round_size=2,
                             time=datetime.now(timezone.utc) - timedelta(seconds=age_s))
            await js.publish(subjects.VARIANT_READY, v.model_dump_json().encode())
            await js.publish(subjects.KERNEL_STATS, b"{}")  # other subjects interleave in the stream
        waiting, lag_s = await benchmark_queue(js)
        assert waiting == 2 and 40 <= lag_s < 60
    finally:
        await nc.close()
