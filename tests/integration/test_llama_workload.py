"""The Llama demo's workload against a real nats-server: each traffic phase publishes kernel.stats
for the op keys its shapes make, through the real SDK; a deploy landing mid-phase is hot-swapped in,
serves the key, and its time from the phase's start is reported."""
import asyncio
import threading
import time

import nats
import pytest
import torch
from nats.js.api import KeyValueConfig

from observer.demos.llama import Llama, LlamaConfig, Phase
from observer.demos.llama_demo import format_summary, run_llama_demo
from observer.sdk import observe, ops
from shared import subjects
from shared.broker import STREAM_CONFIG
from shared.ops import rmsnorm
from shared.schemas import KernelStats, RegistryEntry
from shared.variants import render, variant_id

pytestmark = pytest.mark.nats

HW = "cpu-interpreter"
# one small layer (the interpreter runs every op); vocab unlike hidden, so lm_head has its own key
CONFIG = LlamaConfig(hidden=64, intermediate=96, heads=2, kv_heads=1, head_dim=32, layers=1, vocab=80, max_context=64)
PHASES = (Phase("decode b1", 1, 1, 16), Phase("prefill 32", 1, 32, 0))


def keys(*names: str) -> set[str]:
    return {f"{HW}.{name}" for name in names}


# qkv: (2 + 2 * 1) heads x 32 = 128 wide; gate_up 2 x 96; lm_head 80; rows 1 -> r16 / t16 / m1, 32 -> r256 / ...
DECODE = keys("rmsnorm.float16.h64-r16", "rmsnorm_residual.float16.h64-r16", "rotary.float16.d32-h2-t16",
              "rotary.float16.d32-h1-t16", "silu_and_mul.float16.h192-r16", "matmul.float16.n128-k64-m1",
              "matmul.float16.n64-k64-m1", "matmul.float16.n192-k64-m1", "matmul.float16.n64-k96-m1",
              "matmul.float16.n80-k64-m1")
PREFILL = keys("rmsnorm.float16.h64-r256", "rmsnorm_residual.float16.h64-r256", "rotary.float16.d32-h2-t256",
               "rotary.float16.d32-h1-t256", "silu_and_mul.float16.h192-r256", "matmul.float16.n128-k64-m64",
               "matmul.float16.n64-k64-m64", "matmul.float16.n192-k64-m64", "matmul.float16.n64-k96-m64")
# lm_head stays m1 in the prefill: its logits are the last position's
DEPLOYED = {"phase 1": f"{HW}.rmsnorm.float16.h64-r16", "phase 2": f"{HW}.rmsnorm.float16.h64-r256"}


def entry() -> RegistryEntry:
    params = {"BLOCK": 64, "ROWS": 4, "num_warps": 2}
    source = render(rmsnorm.TEMPLATE, params)
    return RegistryEntry(variant_id=variant_id(source, params), source=source, params=params, speedup=3.5,
                         campaign_id="camp-llama", approved_by="gate", trace_id="4bf92f3577b34da6a3ce929d0e0e4736")


async def stats_on_stream(js) -> list[KernelStats]:
    sub = await js.pull_subscribe(subjects.KERNEL_STATS, durable="test-llama", stream=subjects.STREAM_NAME)
    got = []
    while True:
        try:
            msgs = await sub.fetch(100, timeout=1.0)
        except nats.errors.TimeoutError:
            return got
        got += [KernelStats.model_validate_json(m.data) for m in msgs]


async def test_each_phase_publishes_its_op_keys_and_a_mid_phase_deploy_is_timed_from_the_phase_start(
        nats_url, tmp_path):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(**STREAM_CONFIG)
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY))
    deployed = entry()
    loop = asyncio.get_running_loop()

    def echo(line: str) -> None:
        lines.append(line)
        for phase, key in DEPLOYED.items():
            if line.startswith(phase):  # the loop's deploy of the phase's rmsnorm key lands a second in
                threading.Timer(1.0, lambda key=key: asyncio.run_coroutine_threadsafe(
                    kv.put(key, deployed.model_dump_json().encode()), loop)).start()

    lines: list[str] = []
    model = Llama(CONFIG, ops=ops, device="cpu", dtype=torch.float16)
    runtime = observe(nats_url, hardware=HW, window_s=0.3, sample_every=2, state_dir=tmp_path)
    try:
        started = time.monotonic()
        summary = await asyncio.to_thread(run_llama_demo, runtime, model, PHASES, phase_s=3.0, deadline_s=40.0,
                                          step_interval_s=0.0, wait_ops=("rmsnorm",), echo=echo)
        elapsed = time.monotonic() - started
    finally:
        await asyncio.to_thread(runtime.close)
    published = await stats_on_stream(js)
    await nc.close()
    print("\n".join(lines))

    assert {str(s.key) for s in published} == DECODE | PREFILL
    rows = {r["key"]: r for r in summary["keys"]}
    assert set(rows) == DECODE | PREFILL
    assert {k for k, r in rows.items() if r["phase"] == "decode b1"} == DECODE
    assert {k for k, r in rows.items() if r["phase"] == "prefill 32"} == PREFILL
    assert all(r["calls"] > 0 for r in rows.values())
    assert all(r["before_us_per_call"] > 0 for k, r in rows.items() if k.split(".")[1] != "rmsnorm")

    for key in DEPLOYED.values():
        row = rows[key]
        assert (row["variant_id"], row["speedup"], row["campaign_id"]) == (deployed.variant_id, 3.5, "camp-llama")
        assert 1.0 <= row["traffic_to_served_s"] < 10.0 and row["within_target"]
    assert all(r["variant_id"] is None for k, r in rows.items() if k not in DEPLOYED.values())
    # the last phase went on past its 3 s only until its rmsnorm key's deploy had served a window
    assert any(line.startswith(f"  rmsnorm.float16.h64-r256 now served by {deployed.variant_id}") for line in lines)
    assert sum(line.startswith("  new key ") for line in lines) == len(DECODE | PREFILL)
    assert elapsed < 25.0 and not any(line.startswith("deadline") for line in lines)
    table = format_summary(summary)
    assert DEPLOYED["phase 2"] in table and deployed.variant_id in table and "2 key(s) deployed and served" in table
