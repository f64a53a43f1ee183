"""An op added from a KernelBench-format file goes through the loop: registered under the state dir,
its campaign's kernels come from the (scripted) LLM since it has no template, the benchmarker (its
own process, as in production) checks them against the file's Model and times them against its
fallback, and the deployer deploys the faster one."""
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

import deployer.app
import generator.app
from shared import subjects
from shared.broker import make_broker
from shared.ops import get_op
from shared.registry import Registry
from shared.schemas import Budget, Campaign, Deploy, Hypothesis, KernelKey, WeightedShape
from shared.settings import Settings
from shared.userops import register_op_file
from shared.variants import variant_id
from support import rmsnorm_answers, row_scale_answers
from support.llm_server import ScriptedLLM, answer

pytestmark = pytest.mark.nats

DATA = Path(__file__).parent.parent / "data" / "kernelbench"


async def test_an_op_from_a_kernelbench_file_gets_an_llm_kernel_deployed(nats_url, tmp_path, monkeypatch, user_ops):
    state = user_ops.parent
    monkeypatch.setenv("KERNELLOOP_STATE_DIR", str(state))  # the benchmarker process's start-up reads it
    op = register_op_file(DATA / "row_scale.py", user_ops)
    assert get_op("row_scale").NAME == op.NAME
    key = KernelKey(hardware="cpu-interpreter", op="row_scale", dtype="float32", bucket=op.shape_bucket([1024, 16]))
    campaign = Campaign(campaign_id="kb-1", key=key, profile=[WeightedShape(shape=[1024, 16], weight=1.0)],
                        budget=Budget(rounds=2, variants_per_round=1))
    env = {**os.environ, "NATS_URL": nats_url, "KERNELLOOP_BENCH_REPS": "5", "PYTHONUNBUFFERED": "1"}
    bench = subprocess.Popen([sys.executable, "-m", "benchmarker"], env=env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "benchmarker.log", "w"))
    with ScriptedLLM([answer(rmsnorm_answers.PROSE), answer(row_scale_answers.GOOD)]) as llm:
        config = Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=state, OPENAI_BASE_URL=llm.base_url,
                          KERNELLOOP_LLM_MODELS="model-a")
        apps = [m.build_app(config) for m in (generator.app, deployer.app)]
        try:
            for app in apps:
                await app.start()
            client, _ = make_broker(nats_url)
            async with client:
                await client.start()
                nc = await nats.connect(nats_url)
                js = nc.jetstream()
                deploys = await js.pull_subscribe(subjects.DEPLOY, durable="test-deploys", stream=subjects.STREAM_NAME)
                await js.publish(subjects.HYPOTHESIS, Hypothesis(campaign=campaign, reason="manual").model_dump_json().encode())
                [msg] = await deploys.fetch(1, timeout=120)
                deploy = Deploy.model_validate_json(msg.data)
                entry = (await (await Registry.open(client)).read(key)).entry
                await nc.close()
        finally:
            for app in reversed(apps):
                await app.stop()
            bench.terminate()
            bench.wait(30)
    kernel_id = variant_id(row_scale_answers.KERNEL_SOURCE.strip() + "\n", {})
    assert deploy.variant_id == kernel_id and entry.variant_id == kernel_id
    assert deploy.speedup_ci_low > 1.0
    assert "class Model(nn.Module)" in llm.user_prompt(0) and "launch(x)" in llm.user_prompt(0)
