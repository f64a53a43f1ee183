"""The program database lives in JetStream KV: a generator restarted mid-campaign resumes with what
the first one learned (earlier answers, benchmark verdicts, tokens spent), a redelivered hypothesis
republishes the same round without asking the LLM again, and a later campaign of the same op starts
from the best program found before."""
import asyncio
import time

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from generator.app import build_app
from shared import subjects
from shared.hardware import fingerprint
from shared.schemas import (BenchResult, Budget, Campaign, Hypothesis, KernelKey, Refine, ShapeTiming, VariantReady,
                            WeightedShape)
from shared.settings import Settings
from shared.variants import source_sha256
from support import rmsnorm_answers as answers
from support.llm_server import ScriptedLLM, answer

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
PROFILE = [WeightedShape(shape=[16, 1024], weight=1.0)]


def campaign(campaign_id: str) -> Campaign:
    return Campaign(campaign_id=campaign_id, key=KEY, profile=PROFILE, budget=Budget(rounds=3, variants_per_round=1))


async def send(js, subject, event):
    return await js.publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})


async def acked(js, durable, seq, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(subjects.STREAM_NAME, durable)
        if info.ack_floor.stream_seq >= seq and not info.num_ack_pending:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{durable} did not ack #{seq}")


async def next_variant(reader) -> VariantReady:
    [msg] = await reader.fetch(1, timeout=15)
    await msg.ack()
    return VariantReady.model_validate_json(msg.data)


def result(v: VariantReady, status: str, error: str | None = None, low: float | None = None) -> BenchResult:
    timings = [ShapeTiming(shape=[16, 1024], weight=1.0, candidate_us=50.0, candidate_spread_us=1.0,
                           incumbent_us=100.0, incumbent_spread_us=1.0, speedup=2.0)] if low else []
    return BenchResult(campaign=v.campaign, variant_id=v.variant_id, source=v.source,
                       measured_sha256=source_sha256(v.source), strategy=v.strategy,
                       round=v.round, round_size=v.round_size, status=status, error=error, timings=timings,
                       weighted_speedup=low and low + 0.1, speedup_ci_low=low, hardware=fingerprint())


async def test_a_restarted_generator_resumes_the_campaign_from_the_database(nats_url, tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    script = [answer(answers.SYNTAX_ERROR), answer(answers.PARTIAL), answer(answers.GOOD), answer(answers.PROSE)]
    with ScriptedLLM(script, repeat_last=True) as llm:
        config = Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=tmp_path, OPENAI_BASE_URL=llm.base_url,
                          KERNELLOOP_LLM_MODELS="model-a", KERNELLOOP_STRATEGIES="llm")
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        first = build_app(config, provider)
        await first.start()
        reader = await js.pull_subscribe(subjects.VARIANT_READY, durable="test-reader", stream=subjects.STREAM_NAME)
        hypothesis = Hypothesis(campaign=campaign("resume"), reason="manual")
        await send(js, subjects.HYPOTHESIS, hypothesis)
        partial = await next_variant(reader)
        ack = await send(js, subjects.BENCH_RESULT,
                         result(partial, "incorrect", "shape [5, 2049], trial 0: relative error 0.41"))
        await acked(js, subjects.GENERATOR_RESULTS_DURABLE, ack.seq)
        await first.stop()  # the restart: nothing of the first generator's memory is left

        second = build_app(config, provider)
        await second.start()
        try:
            again = await send(js, subjects.HYPOTHESIS, hypothesis.model_copy(update={"event_id": "resent"}))
            await acked(js, subjects.DURABLE[subjects.HYPOTHESIS], again.seq)
            assert len(llm.requests) == 2  # the round was replayed from the database, not asked again
            info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=subjects.VARIANT_READY)
            assert info.state.subjects[subjects.VARIANT_READY] == 1  # and JetStream dropped the copy

            # the refine names no failures: what the prompt says about round 0 comes from the database
            await send(js, subjects.REFINE, Refine(campaign=hypothesis.campaign, round=1, rounds_left=2,
                                                   tried=[partial.variant_id]))
            good = await next_variant(reader)
            prompt = llm.user_prompt(2)
            assert "syntax error" in prompt
            assert f"program {partial.variant_id}: incorrect: shape [5, 2049]" in prompt
            assert good.round == 1 and good.strategy == "llm" and good.parents == []
            ack = await send(js, subjects.BENCH_RESULT, result(good, "ok", low=1.8))
            await acked(js, subjects.GENERATOR_RESULTS_DURABLE, ack.seq)

            # a later campaign of the same hardware, op and dtype starts from the best program
            await send(js, subjects.HYPOTHESIS, Hypothesis(campaign=campaign("later"), reason="manual"))
            deadline = time.monotonic() + 15
            while len(llm.requests) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert f"Parent program {good.variant_id}: correct, 1.90x" in llm.user_prompt(3)
        finally:
            await second.stop()
            await nc.close()
    generates = [s for s in exporter.get_finished_spans() if s.name == "generate"
                 and s.attributes["campaign_id"] == "resume"]
    assert [s.attributes.get("llm_tokens_used") for s in generates] == [600, None, 900]
    assert generates[1].attributes["replayed"] is True
