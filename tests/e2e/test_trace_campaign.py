"""A model that calls no kernelloop op, observed only through its profiler traces: five service
processes on a real nats-server, one trace dropped into the observer's folder and one sent with
`kernelloop observe trace`, and the campaigns they start run through generation and benchmarking."""
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from shared import subjects, supervisor
from shared.schemas import BenchResult, Hypothesis
from support.profiled_model import profile_block

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
# One confirming slot of 1 s: the second trace, recorded a slot after the first, closes the first's.
FAST = {"KERNELLOOP_BENCH_REPS": "5", "KERNELLOOP_ROUNDS": "1", "KERNELLOOP_VARIANTS_PER_ROUND": "2",
        "KERNELLOOP_WINDOW_S": "1", "KERNELLOOP_CONFIRM_WINDOWS": "1", "KERNELLOOP_TRACE_POLL_S": "0.5",
        "TRITON_INTERPRET": "1"}
# The keys the profiled block's calls have (tests/support/profiled_model.py): a campaign is for one of them.
MODEL_KEYS = {f"cpu-interpreter.{k}" for k in ("matmul.bfloat16.n96-k64-m16", "matmul.bfloat16.n64-k96-m16",
                                               "rmsnorm.bfloat16.h64-r16", "silu_and_mul.bfloat16.h192-r16",
                                               "softmax.bfloat16.n5-r16", "layernorm.bfloat16.h64-r16")}


async def _first(nats_url: str, subject: str, model, timeout: float):
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(subject, stream=subjects.STREAM_NAME, ordered_consumer=True)
        msg = await sub.next_msg(timeout=timeout)
        return model.model_validate_json(msg.data)
    finally:
        await nc.close()


def test_profiled_model_traces_start_campaigns_that_reach_the_benchmarker(nats_url, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    profile_block(tmp_path / "step-1.json", steps=3)
    time.sleep(1.5)
    profile_block(tmp_path / "step-2.json", steps=3)
    env = {**FAST, "KERNELLOOP_TRACE_DIR": str(inbox)}
    loop = supervisor.start(tmp_path / "state", nats_url=nats_url, env=env)
    try:
        loop.wait_ready()
        (tmp_path / "step-1.json").rename(inbox / "step-1.json")
        cli_env = {**os.environ, **env, "NATS_URL": nats_url, "KERNELLOOP_STATE_DIR": str(tmp_path / "state")}
        sent = subprocess.run([sys.executable, "-m", "kernelloop", "observe", "trace", str(tmp_path / "step-2.json")],
                              cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr

        hypothesis = asyncio.run(_first(nats_url, subjects.HYPOTHESIS, Hypothesis, timeout=120))
        assert str(hypothesis.campaign.key) in MODEL_KEYS
        result = asyncio.run(_first(nats_url, subjects.BENCH_RESULT, BenchResult, timeout=420))
        assert str(result.campaign.key) in MODEL_KEYS and result.variant_id
        assert (inbox / "done" / "step-1.json").exists()
        assert not loop.dead(), f"{loop.dead()} exited; logs in {tmp_path / 'state' / 'logs'}"
    finally:
        loop.stop()
