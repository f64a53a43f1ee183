"""Crossover by the LLM: with two good programs of the op in the database (from an earlier campaign),
a crossover round asks the model to combine them and names both as the child's parents."""
import nats
import pytest

from generator.app import build_app
from generator.database import Program, ProgramStore
from shared import subjects
from shared.broker import make_broker
from shared.ops import rmsnorm
from shared.schemas import Budget, Campaign, Hypothesis, KernelKey, VariantReady, WeightedShape
from shared.settings import Settings
from shared.variants import render, variant_id
from support import rmsnorm_answers as answers
from support.llm_server import ScriptedLLM, answer

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")


def earlier(block: int, low: float) -> Program:
    params = {**answers.FAST_PARAMS, "BLOCK": block}
    source = render(rmsnorm.TEMPLATE, params)
    return Program(variant_id=variant_id(source, {}), source=source, strategy="llm", campaign_id="earlier", round=0,
                   bucket=KEY.bucket, islands=[0], status="ok", weighted_speedup=low + 0.1, speedup_ci_low=low)


async def test_crossover_round_combines_two_programs_of_the_database(nats_url, tmp_path):
    parents = [earlier(2048, 1.3), earlier(4096, 1.2)]
    client, _ = make_broker(nats_url)
    async with client:
        await client.start()
        await (await ProgramStore.open(client)).save(KEY, parents)
    campaign = Campaign(campaign_id="cross", key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                        budget=Budget(rounds=2, variants_per_round=1))
    with ScriptedLLM([answer(answers.GOOD)]) as llm:
        app = build_app(Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=tmp_path, OPENAI_BASE_URL=llm.base_url,
                                 KERNELLOOP_LLM_MODELS="model-a", KERNELLOOP_STRATEGIES="crossover"))
        await app.start()
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            reader = await js.pull_subscribe(subjects.VARIANT_READY, durable="test-reader", stream=subjects.STREAM_NAME)
            await js.publish(subjects.HYPOTHESIS, Hypothesis(campaign=campaign, reason="manual").model_dump_json().encode())
            [msg] = await reader.fetch(1, timeout=20)
        finally:
            await app.stop()
            await nc.close()
    child = VariantReady.model_validate_json(msg.data)
    assert child.strategy == "llm" and child.parents == [p.variant_id for p in parents]
    prompt = llm.user_prompt(0)
    assert f"Combine the strengths of the parent {parents[0].variant_id} and {parents[1].variant_id}" in prompt
