"""The deployer's spans read well in a trace viewer: the decision that closes a round links every
result it fans in from, and decide and deploy carry the stage attributes."""
import asyncio
import time

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployer.app import build_app
from shared import subjects
from shared.schemas import BenchResult, Budget, Campaign, Hardware, KernelKey, WeightedShape
from shared.settings import Settings
from shared.variants import source_sha256, variant_id

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
HARDWARE = Hardware(key=KEY.hardware, name="cpu", interpreter=True, torch="test", triton="test")
CAMPAIGN = Campaign(campaign_id="camp-spans", key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                    budget=Budget(rounds=1, variants_per_round=3))


def result(block: int, speedup: float) -> BenchResult:
    source, params = f"# BLOCK={block}\n", {"BLOCK": block}
    return BenchResult(campaign=CAMPAIGN, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=0, round_size=3, status="ok", weighted_speedup=speedup,
                       speedup_ci_low=speedup - 0.05, speedup_ci_high=speedup + 0.05, hardware=HARDWARE)


async def test_round_closing_decision_links_every_result_and_stage_spans_carry_attributes(nats_url, tmp_path):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = build_app(Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=str(tmp_path)), provider)
    await app.start()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for r in (result(256, 1.01), result(512, 1.02), result(1024, 1.5)):
            await js.publish(subjects.BENCH_RESULT, r.model_dump_json().encode(), headers={"Nats-Msg-Id": r.event_id})
        deadline = time.monotonic() + 20
        while not [s for s in spans.get_finished_spans() if s.name == "deploy"]:
            assert time.monotonic() < deadline, "no deploy span"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
        await app.stop()
    finished = spans.get_finished_spans()
    decides = [s for s in finished if s.name == "decide"]
    assert len(decides) == 3
    closing = [s for s in decides if s.attributes.get("decision") == "deploy"]
    assert len(closing) == 1
    linked = {link.context.span_id for link in closing[0].links}
    others = {s.context.span_id for s in decides if s is not closing[0]}
    assert others <= linked, "the closing decision does not link the results it fans in from"
    for s in decides:
        assert {"campaign_id", "op", "bucket", "variant_id", "strategy", "status"} <= set(s.attributes)
    [deploy] = [s for s in finished if s.name == "deploy"]
    assert deploy.attributes["bucket"] == "h1024-r16" and deploy.attributes["speedup"] == 1.5
    assert deploy.attributes["campaign_id"] == "camp-spans" and deploy.attributes["approved_by"] == "auto-gate"
