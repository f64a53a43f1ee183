"""The benchmarker service against a real nats-server: variant.ready in, bench.result out, one trace."""
import asyncio
import hashlib

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from benchmarker.app import build_app
from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish
from shared.ops import rmsnorm
from shared.schemas import BenchResult, Campaign, KernelKey, VariantReady, WeightedShape
from shared.settings import Settings
from shared.variants import render, variant_id

pytestmark = pytest.mark.nats

PARAMS = {"BLOCK": 1024, "ROWS": 2, "num_warps": 4}


def _variant(op: str = "rmsnorm") -> VariantReady:
    source = render(rmsnorm.TEMPLATE, PARAMS)
    key = KernelKey(hardware="cpu-interpreter", op=op, dtype="float16", bucket="h256-r16")
    campaign = Campaign(key=key, profile=[WeightedShape(shape=[4, 256], weight=1.0)])
    return VariantReady(campaign=campaign, variant_id=variant_id(source, PARAMS), source=source, params=PARAMS,
                        strategy="grid", round=0, round_size=1)


def _settings(nats_url: str, tmp_path) -> Settings:
    return Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=tmp_path / "state", KERNELLOOP_BENCH_REPS=3,
                    KERNELLOOP_BENCH_TIMEOUT_S=120)


async def _run(nats_url, tmp_path, variants: list[VariantReady], provider=None, expect: int = 1) -> list[BenchResult]:
    """Start the service, publish the variants, collect what arrives on bench.result."""
    app = build_app(_settings(nats_url, tmp_path), provider)
    client, _ = make_broker(nats_url, provider)
    got: asyncio.Queue = asyncio.Queue()

    @durable_subscriber(client, subjects.BENCH_RESULT)
    async def on_bench_result(result: BenchResult) -> None:
        await got.put(result)

    await app.start()
    try:
        async with client:
            await client.start()
            for variant in variants:
                await publish(client, subjects.VARIANT_READY, variant)
            results = [await asyncio.wait_for(got.get(), 120) for _ in range(expect)]
            await asyncio.sleep(1.5)  # anything more would be a duplicate
            while not got.empty():
                results.append(got.get_nowait())
    finally:
        await app.stop()
    return results


async def test_variant_ready_yields_a_bench_result_in_the_same_trace(nats_url, tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    variant = _variant()

    [result] = await _run(nats_url, tmp_path, [variant], provider)

    assert result.status == "ok", result.error
    assert result.variant_id == variant.variant_id
    assert result.measured_sha256 == hashlib.sha256(variant.source.encode()).hexdigest()
    assert result.event_id == f"result-{variant.variant_id}-{variant.campaign.campaign_id}"
    assert [t.shape for t in result.timings] == [[4, 256]]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    bench = spans["benchmark"]
    assert bench.attributes["variant_id"] == variant.variant_id
    assert bench.attributes["campaign_id"] == variant.campaign.campaign_id
    assert bench.attributes["status"] == "ok"
    assert bench.attributes["speedup"] == pytest.approx(result.weighted_speedup)
    for stage in ("compile", "check", "time"):
        assert spans[stage].parent.span_id == bench.context.span_id
    publisher = [s for s in exporter.get_finished_spans() if s.name.endswith("publish") and "variant" in s.name]
    assert publisher and publisher[0].context.trace_id == bench.context.trace_id


async def test_resent_variant_with_unknown_op_yields_one_rejected_result(nats_url, tmp_path):
    first = _variant(op="no_such_op")
    again = first.model_copy(update={"event_id": "a-resend-under-a-new-event-id"})

    results = await _run(nats_url, tmp_path, [first, again])

    assert len(results) == 1, "the second benchmark's result was not de-duplicated"
    assert results[0].status == "rejected"
    assert "no_such_op" in results[0].error
