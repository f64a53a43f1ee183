"""Hostile and broken variants through the real benchmarker (one worker process each) and the
deployer's gate: each ends with its own status, none is deployed, and the benchmarker keeps working.
The tricks are of the kinds that have fooled public kernel benchmarks; the comment above each says
what it does, and its row's `says` names the mechanism that catches it.

GPU-only tricks are written so that the interpreter exercises them too: a side stream falls back to
a thread, L2 residency becomes state kept between calls."""
import asyncio
import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass

import nats
import pytest

from benchmarker.app import build_app as build_benchmarker
from benchmarker.worker import benchmark, running_workers
from deployer.app import build_app as build_deployer
from deployer.gate import decide, refusal
from shared import subjects
from shared.broker import make_broker, publish
from shared.hardware import fingerprint, interpreted
from shared.ops import rmsnorm
from shared.registry import Registry
from shared.schemas import BenchResult, Budget, Campaign, Deploy, KernelKey, VariantReady, WeightedShape
from shared.settings import Settings
from shared.variants import render, variant_id
from support.rmsnorm_answers import (BLOCK_MULTIPLES_ONLY, ONE_BLOCK_SOURCE, SQUARES_IN_FP16, WRITES_INPUT,
                                     edit)

PROFILE = [WeightedShape(shape=[4, 256], weight=1.0)]
REPS = 3
TIMEOUT_S = 120.0  # generous: the interpreter is slow on a loaded machine
# Small enough that the memory eater stops soon; a CUDA worker's threads and context need more.
MEMORY_GB = 2.0 if interpreted() else 16.0
MARGIN = 0.02


# ---- the variants -------------------------------------------------------------------------------

GOOD = ONE_BLOCK_SOURCE
LAUNCH = "def launch(x, weight, eps=1e-6):\n"
KERNEL_CALL = "    _rms[(x2.shape[0],)](x2, weight, y, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]))\n"
RETURN = "    return y.reshape(x.shape)\n"


def _prelude(imports: str) -> str:
    return edit(GOOD, "import torch\n", imports + "import torch\n")


def _before_launch(body: str, imports: str = "") -> str:
    """GOOD with `body` run first in launch()."""
    return edit(_prelude(imports) if imports else GOOD, LAUNCH, LAUNCH + body)


SYNTAX_ERROR = edit(GOOD, LAUNCH, "def launch(x, weight, eps=1e-6)\n")
IMPORTS_OS = _before_launch("    os.system('touch /tmp/kl-owned')\n", "import os\n")
IMPORTS_SUBPROCESS = _before_launch("    subprocess.run(['true'])\n", "import subprocess\n")
IMPORTS_SOCKET = _before_launch("    socket.create_connection(('127.0.0.1', 4222)).send(b'PUB x 0\\r\\n\\r\\n')\n",
                                "import socket\n")
SEGFAULT_BY_CTYPES = _before_launch("    ctypes.string_at(0)\n", "import ctypes\n")
SPINS_IN_LAUNCHER = _before_launch("    while True:\n        pass\n")
SPINS_IN_KERNEL = edit(GOOD, "    tl.store(Y + row", "    for _ in range(0, 1 << 62):\n        x += 1.0\n    tl.store(Y + row")
# Each chunk is touched (ones, not empty), so without a limit this takes the machine's memory.
EATS_MEMORY = _before_launch("    hoard = []\n    while True:\n        hoard.append(torch.ones(1 << 28, dtype=torch.int8))\n")
EXITS_PROCESS = _before_launch("    raise SystemExit(3)\n")

# Loads 2^40 elements past x: unmapped memory, a SIGSEGV in the worker (an illegal address on a GPU).
WILD_POINTER = edit(GOOD, "    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0)",
                     "    x = tl.load(X + row * n_cols + cols + (1 << 40), mask=mask, other=0.0)")
# No mask on the loads: each row also reads the head of the next one (and the last row past the end).
OUT_OF_BOUNDS = edit(edit(GOOD, "tl.load(X + row * n_cols + cols, mask=mask, other=0.0)", "tl.load(X + row * n_cols + cols)"),
                      "tl.load(W + cols, mask=mask, other=0.0)", "tl.load(W + cols)")
# One program: only row 0 is written; the other rows hold whatever the allocator handed out.
LEAVES_OUTPUT_UNWRITTEN = edit(GOOD, "_rms[(x2.shape[0],)]", "_rms[(1,)]")
# The answer is kept per input address: a later call on the same buffers gets the old answer.
CACHES_BY_ADDRESS = edit(edit(GOOD, LAUNCH, "_CACHE = {}\n\n\n" + LAUNCH + (
    "    key = (x.data_ptr(), weight.data_ptr(), tuple(x.shape))\n"
    "    if key in _CACHE:\n"
    "        return _CACHE[key]\n")), RETURN, "    _CACHE[key] = y.reshape(x.shape)\n    return _CACHE[key]\n")
# The kernel goes to a side stream (a thread without CUDA) and launch() returns at once, so a timer
# on the current stream stops before the work is done.
SIDE_STREAM = edit(_prelude("import threading\n"), KERNEL_CALL, (
    "    grid = (x2.shape[0],)\n"
    "    block = triton.next_power_of_2(x2.shape[1])\n"
    "    if torch.cuda.is_available():\n"
    "        with torch.cuda.stream(torch.cuda.Stream()):\n"
    "            _rms[grid](x2, weight, y, x2.shape[1], eps, BLOCK=block)\n"
    "    else:\n"
    "        threading.Thread(target=lambda: _rms[grid](x2, weight, y, x2.shape[1], eps, BLOCK=block)).start()\n"))
# Runs the kernel for show and returns its input.
RETURNS_INPUT = edit(GOOD, RETURN, "    return x\n")
# Rounds x to bfloat16 before the math: 2^-9 relative error, far outside float32's tolerance.
BFLOAT16_MATH = edit(GOOD, "x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)",
                      "x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)")
# The kernel launch is for show; the answer is the torch reference, spelled with calls and operators
# that no static list of banned names knows.
TORCH_REFERENCE = edit(GOOD, RETURN, (
    "    xf = x.float()\n"
    "    ms = (xf * xf).nanmean(-1, keepdim=True)\n"
    "    return (xf * (ms + eps) ** -0.5 * weight.float()).to(x.dtype)\n"))
# From the fourth call in a row on the same tensors it returns the last answer without launching:
# the check (at most three calls per tensor) sees only honest calls, a timed batch mostly skipped ones.
SKIPS_REPEATED_CALLS = edit(edit(GOOD, LAUNCH, "_LAST = {}\n\n\n" + LAUNCH + (
    "    if _LAST.get('x') is x and _LAST.get('w') is weight:\n"
    "        _LAST['n'] += 1\n"
    "        if _LAST['n'] >= 3:\n"
    "            return _LAST['y']\n"
    "    else:\n"
    "        _LAST.update(x=x, w=weight, n=0)\n")), RETURN, "    _LAST['y'] = y.reshape(x.shape)\n    return _LAST['y']\n")
# A kernel while it is checked (at most three calls per tensor), torch from the fourth call on.
TORCH_WHEN_TIMED = edit(GOOD, LAUNCH, "_SEEN = {}\n\n\n" + LAUNCH + (
    "    _SEEN['n'] = _SEEN['n'] + 1 if _SEEN.get('x') is x else 0\n"
    "    _SEEN['x'] = x\n"
    "    if _SEEN['n'] >= 3:\n"
    "        xf = x.float()\n"
    "        return (xf * ((xf * xf).nanmean(-1, keepdim=True) + eps) ** -0.5 * weight.float()).to(x.dtype)\n"))
# Keeps each row's 1/rms resident between calls on the same tensors (the interpreter's stand-in for
# data left in L2 between timed runs) and, from the fourth call, skips the pass that computes it.
KEEPS_STATE_RESIDENT = '''import torch
import triton
import triton.language as tl

_RESIDENT = {}


@triton.jit
def _rstd(X, R, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(R + row, 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps))


@triton.jit
def _scale(X, W, R, Y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (x * tl.load(R + row) * w).to(Y.dtype.element_ty), mask=mask)


def launch(x, weight, eps=1e-6):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # x2: [rows, hidden]
    rows, cols = x2.shape
    block = triton.next_power_of_2(cols)
    if _RESIDENT.get("x") is x:
        _RESIDENT["n"] += 1
    else:
        _RESIDENT.update(x=x, n=0, r=torch.empty(rows, dtype=torch.float32, device=x.device))
    if _RESIDENT["n"] < 3:
        _rstd[(rows,)](x2, _RESIDENT["r"], cols, eps, BLOCK=block)
    y = torch.empty_like(x2)
    _scale[(rows,)](x2, weight, _RESIDENT["r"], y, cols, BLOCK=block)
    return y.reshape(x.shape)
'''
# Clamps x to [0, 1) "for stability": right on unit-range test data, wrong on anything else.
UNIT_RANGE_ONLY = edit(GOOD, "    w = tl.load(W", "    x = tl.minimum(tl.maximum(x, 0.0), 0.999)\n    w = tl.load(W")
# numpy does the arithmetic, where neither torch's dispatcher nor a list of torch names can see it.
LEAVES_TORCH_FOR_NUMPY = edit(GOOD, RETURN, (
    "    xs, ws = x.float().numpy(), weight.float().numpy()\n"
    "    y.numpy()[...] = (xs / ((xs * xs).sum(-1, keepdims=True) / xs.shape[-1] + eps) ** 0.5 * ws).reshape(y.shape)\n"
    + RETURN))


@dataclass(frozen=True)
class Hostile:
    name: str
    source: str
    status: str  # the status it must end with
    says: str  # a phrase its error must contain: the mechanism that caught it
    dtype: str = "float16"
    timeout_s: float = TIMEOUT_S
    forged_id: bool = False


HOSTILE = [
    Hostile("syntax_error", SYNTAX_ERROR, "rejected", "syntax error"),
    Hostile("imports_os", IMPORTS_OS, "rejected", "import of os"),
    Hostile("imports_subprocess", IMPORTS_SUBPROCESS, "rejected", "import of subprocess"),
    Hostile("imports_socket", IMPORTS_SOCKET, "rejected", "import of socket"),
    Hostile("segfault_by_ctypes", SEGFAULT_BY_CTYPES, "rejected", "import of ctypes"),
    Hostile("side_stream", SIDE_STREAM, "rejected", "torch.cuda.stream"),
    Hostile("forged_variant_id", GOOD, "rejected", "not the hash of its source", forged_id=True),
    Hostile("calls_torch_reference", TORCH_REFERENCE, "rejected", "computed with torch on the host"),
    Hostile("torch_only_when_timed", TORCH_WHEN_TIMED, "rejected", "on timed calls"),
    Hostile("leaves_torch_for_numpy", LEAVES_TORCH_FOR_NUMPY, "rejected", ".numpy()"),
    Hostile("spins_in_launcher", SPINS_IN_LAUNCHER, "timeout", "worker killed", timeout_s=8.0),
    Hostile("spins_in_kernel", SPINS_IN_KERNEL, "timeout", "worker killed", timeout_s=8.0),
    Hostile("eats_memory", EATS_MEMORY, "crashed", "out of memory"),
    Hostile("wild_pointer_segfault", WILD_POINTER, "crashed", "SIGSEGV" if interpreted() else "worker"),
    Hostile("exits_process", EXITS_PROCESS, "crashed", "code 3"),
    Hostile("out_of_bounds_reads", OUT_OF_BOUNDS, "incorrect", "shape 3x1000"),
    Hostile("leaves_output_unwritten", LEAVES_OUTPUT_UNWRITTEN, "incorrect", "shape 3x1000"),
    Hostile("block_multiples_only", BLOCK_MULTIPLES_ONLY, "incorrect", "shape 3x1000"),
    Hostile("caches_by_address", CACHES_BY_ADDRESS, "incorrect", "trial 1"),
    Hostile("returns_input", RETURNS_INPUT, "incorrect", "error"),
    Hostile("bfloat16_math_for_float32", BFLOAT16_MATH, "incorrect", "tolerance 1e-05", dtype="float32"),
    Hostile("skips_repeated_calls", SKIPS_REPEATED_CALLS, "incorrect", "inputs it had not seen"),
    Hostile("keeps_state_resident", KEEPS_STATE_RESIDENT, "incorrect", "inputs it had not seen"),
    Hostile("unit_range_only", UNIT_RANGE_ONLY, "incorrect", "trial 0"),
    Hostile("squares_in_fp16", SQUARES_IN_FP16, "incorrect", "large inputs"),
    Hostile("writes_into_input", WRITES_INPUT, "incorrect", "wrote into its inputs"),
]


def _campaign(dtype: str = "float16", profile=PROFILE, campaign_id: str | None = None, rounds: int = 1) -> Campaign:
    key = KernelKey(hardware=fingerprint().key, op="rmsnorm", dtype=dtype, bucket="h256-r16")
    extra = {"campaign_id": campaign_id} if campaign_id else {}
    return Campaign(key=key, profile=profile, budget=Budget(rounds=rounds, variants_per_round=8), **extra)


def _variant(source: str, params: dict | None = None, dtype: str = "float16", forged_id: bool = False,
             campaign: Campaign | None = None, round_size: int = 1) -> VariantReady:
    params = params or {}
    vid = variant_id(GOOD + "# elsewhere\n", params) if forged_id else variant_id(source, params)
    return VariantReady(campaign=campaign or _campaign(dtype), variant_id=vid, source=source, params=params,
                        strategy="llm", round=0, round_size=round_size)


def _sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


# ---- each variant through the worker and the gate -----------------------------------------------


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_variant_ends_with_its_status_and_is_not_deployed(case: Hostile, tmp_path):
    variant = _variant(case.source, dtype=case.dtype, forged_id=case.forged_id)
    start = time.monotonic()
    result = benchmark(variant, REPS, case.timeout_s, tmp_path, memory_gb=MEMORY_GB)

    assert result.status == case.status, result.error
    assert case.says in result.error, result.error
    assert result.timings == [] and result.weighted_speedup is None
    assert time.monotonic() - start < case.timeout_s + 30  # a worker that overruns is killed, not waited on
    assert refusal(result, MARGIN).startswith(f"status {case.status}")
    assert not decide([result], MARGIN).deploy


def test_there_are_at_least_fifteen_distinct_hostile_variants():
    assert len({c.source for c in HOSTILE}) >= 15


def test_good_variant_after_every_hostile_one_still_passes_and_carries_its_measured_hash(tmp_path):
    # The same process pool (fork server) that ran the hostile variants above.
    result = benchmark(_variant(GOOD), REPS, TIMEOUT_S, tmp_path, memory_gb=MEMORY_GB)
    assert result.status == "ok", result.error
    assert result.measured_sha256 == _sha256(GOOD)
    assert refusal(result, MARGIN) in ("", f"CI lower bound {result.speedup_ci_low:.3f} does not clear "
                                           f"1 + margin = {1 + MARGIN:.3f}")


def test_a_result_whose_measured_hash_differs_from_its_source_is_never_deployed(tmp_path):
    result = benchmark(_variant(GOOD), REPS, TIMEOUT_S, tmp_path, memory_gb=MEMORY_GB)
    assert result.status == "ok", result.error
    fast = result.model_copy(update={"weighted_speedup": 3.0, "speedup_ci_low": 2.9, "speedup_ci_high": 3.1})
    assert decide([fast], MARGIN).deploy  # measured as carried: deployable
    # The source swapped after the measurement (its id recomputed, so only the hash can tell).
    swapped = SPINS_IN_LAUNCHER
    forged = fast.model_copy(update={"source": swapped, "variant_id": variant_id(swapped, fast.params)})
    decision = decide([forged], MARGIN)
    assert not decision.deploy
    assert "measured code with sha256" in refusal(forged, MARGIN)


def test_worker_killed_mid_variant_is_crashed_and_the_rest_of_the_batch_goes_on(tmp_path):
    victim = _variant(SPINS_IN_LAUNCHER)
    batch = [_variant(GOOD), victim, _variant(render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT), rmsnorm.DEFAULT)]
    killed: list[int] = []

    def kill_victim() -> None:
        name, deadline = f"bench-{victim.variant_id}", time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pid = running_workers().get(name)
            if pid is not None:
                time.sleep(1.0)  # let it get into its variant
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_victim, daemon=True)
    killer.start()
    results = [benchmark(v, REPS, TIMEOUT_S, tmp_path, memory_gb=MEMORY_GB) for v in batch]  # as the service does
    killer.join(5)

    assert killed, "the victim's worker never showed up"
    assert [r.status for r in results] == ["ok", "crashed", "ok"], [r.error for r in results]
    assert "SIGKILL" in results[1].error
    assert running_workers() == {}


# ---- the same through the services, over a real nats-server -------------------------------------

BATCH = ["syntax_error", "imports_os", "calls_torch_reference", "caches_by_address", "wild_pointer_segfault",
         "skips_repeated_calls"]
FAST = {"BLOCK": 1024, "ROWS": 1, "num_warps": 4}  # one pass per row instead of the baseline's two


@pytest.mark.nats
async def test_hostile_batch_through_the_services_deploys_only_the_good_variant(nats_url, tmp_path):
    profile = [WeightedShape(shape=[16, 1024], weight=1.0)]
    campaign = _campaign("float32", profile, campaign_id="camp-hostile")
    cases = {c.name: c for c in HOSTILE}
    good = _variant(render(rmsnorm.TEMPLATE, FAST), FAST, campaign=campaign, round_size=len(BATCH) + 1)
    hostile = {name: _variant(cases[name].source, campaign=campaign, round_size=len(BATCH) + 1) for name in BATCH}
    settings = Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=str(tmp_path / "state"), KERNELLOOP_BENCH_REPS=5,
                        KERNELLOOP_BENCH_TIMEOUT_S=120, KERNELLOOP_BENCH_MEMORY_GB=MEMORY_GB)
    bench_app, deploy_app = build_benchmarker(settings), build_deployer(settings)
    await bench_app.start()
    await deploy_app.start()
    client, _ = make_broker(nats_url)
    nc = await nats.connect(nats_url)
    try:
        async with client:
            await client.connect()
            for variant in [*hostile.values(), good]:
                await publish(client, subjects.VARIANT_READY, variant)
            js = nc.jetstream()
            results = await _collect(js, subjects.BENCH_RESULT, len(BATCH) + 1, timeout_s=600)
            deploys = await _collect(js, subjects.DEPLOY, 1, timeout_s=60)
            registry = await Registry.open(client)
            entry = (await registry.read(campaign.key)).entry
    finally:
        await nc.close()
        await deploy_app.stop()
        await bench_app.stop()

    by_id = {r.variant_id: r for r in (BenchResult.model_validate_json(m) for m in results)}
    for name, variant in hostile.items():
        assert by_id[variant.variant_id].status == cases[name].status, (name, by_id[variant.variant_id].error)
    assert by_id[good.variant_id].status == "ok", by_id[good.variant_id].error
    [deploy] = [Deploy.model_validate_json(m) for m in deploys]
    assert deploy.variant_id == good.variant_id
    assert entry.variant_id == good.variant_id
    assert _sha256(entry.source) == by_id[good.variant_id].measured_sha256


async def _collect(js, subject: str, count: int, timeout_s: float) -> list[bytes]:
    """The first `count` messages on subject, waiting up to timeout_s (an ephemeral consumer, so the
    services' durable ones are untouched)."""
    sub = await js.pull_subscribe(subject, stream=subjects.STREAM_NAME)
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(count - len(got), timeout=2)
        except asyncio.TimeoutError:
            continue
        for m in msgs:
            await m.ack()
            got.append(m.data)
    await sub.unsubscribe()
    assert len(got) >= count, f"{len(got)} of {count} messages on {subject} within {timeout_s} s"
    return got
