"""A campaign whose variants a (scripted) LLM writes, end to end over a real nats-server with the
generator, benchmarker and deployer in-process: a syntax error and a prose answer never leave the
generator, a kernel right only on some shapes is benchmarked as incorrect and its failure reaches
the next prompt, and the correct, faster kernel is deployed, all on one trace."""
import asyncio

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import benchmarker.app
import deployer.app
import generator.app
from shared import subjects
from shared.broker import make_broker
from shared.registry import Registry
from shared.schemas import Budget, Campaign, Deploy, Hypothesis, KernelKey, VariantReady, WeightedShape
from shared.settings import Settings
from shared.variants import variant_id
from support import rmsnorm_answers as answers
from support.llm_server import ScriptedLLM, answer, error

pytestmark = pytest.mark.nats

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")


def settings(nats_url: str, tmp_path, llm_url: str) -> Settings:
    return Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=tmp_path / "state", KERNELLOOP_BENCH_REPS=5,
                    KERNELLOOP_BENCH_TIMEOUT_S=120, OPENAI_BASE_URL=llm_url, OPENAI_API_KEY="test",
                    KERNELLOOP_LLM_MODELS="model-a:0.5,model-b:0.5", KERNELLOOP_LLM_BACKOFF_S=0.01,
                    KERNELLOOP_STRATEGIES="llm")


async def test_llm_written_kernel_is_deployed_and_only_it(nats_url, tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    script = [answer(answers.SYNTAX_ERROR), error(500), answer(answers.PROSE), answer(answers.PARTIAL),
              answer(answers.GOOD)]
    campaign = Campaign(campaign_id="llm-e2e", key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                        budget=Budget(rounds=3, variants_per_round=1))
    with ScriptedLLM(script) as llm:
        config = settings(nats_url, tmp_path, llm.base_url)
        apps = [m.build_app(config, provider) for m in (generator.app, deployer.app, benchmarker.app)]
        for app in apps:
            await app.start()
        client, _ = make_broker(nats_url)
        try:
            async with client:
                await client.start()
                nc = await nats.connect(nats_url)
                js = nc.jetstream()
                deploys = await js.pull_subscribe(subjects.DEPLOY, durable="test-deploys", stream=subjects.STREAM_NAME)
                await js.publish(subjects.HYPOTHESIS, Hypothesis(campaign=campaign, reason="manual").model_dump_json().encode(),
                                 headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
                [msg] = await deploys.fetch(1, timeout=150)
                deploy = Deploy.model_validate_json(msg.data)
                entry = (await (await Registry.open(client)).read(KEY)).entry
                variants = [VariantReady.model_validate_json(m.data) for m in
                            await (await js.pull_subscribe(subjects.VARIANT_READY, durable="test-variants",
                                                           stream=subjects.STREAM_NAME)).fetch(10, timeout=2)]
                await nc.close()
        finally:
            for app in reversed(apps):
                await app.stop()

    good_id = variant_id(answers.FAST_SOURCE.strip() + "\n", {})
    partial_id = variant_id(answers.PARTIAL_SOURCE.strip() + "\n", {})
    assert deploy.variant_id == good_id and entry.variant_id == good_id
    assert deploy.speedup_ci_low > 1.0
    # only the two programs with code that passed the static checks reached the benchmarker
    assert [(v.variant_id, v.strategy, v.round) for v in variants] == [(partial_id, "llm", 0), (good_id, "llm", 1)]

    # the partial kernel's failure, with its shape, is in the prompt that produced the good one
    last_prompt = llm.user_prompt(4)
    assert f"program {partial_id}: incorrect" in last_prompt and "2049" in last_prompt
    assert "syntax error" in last_prompt and "no_code" in last_prompt

    spans = exporter.get_finished_spans()
    calls = [s for s in spans if s.name == "llm.call"]
    assert [s.attributes["status"] for s in calls] == ["rejected", "no_code", "proposed", "proposed"]
    assert calls[1].attributes["attempts"] == 2  # the 500 was retried
    assert all(f"{s.context.trace_id:032x}" == TRACE_ID for s in calls)
    assert all(s.attributes["prompt_tokens"] > 0 and s.attributes["completion"] for s in calls)
    generates = [s for s in spans if s.name == "generate"]
    assert [s.attributes["strategy"] for s in generates] == ["llm", "llm"]
    assert generates[-1].attributes["llm_tokens_used"] == 4 * 300
    rewards = [s for s in spans if s.name == "bandit.reward"]
    assert rewards and rewards[0].attributes["strategy"] == "llm"
