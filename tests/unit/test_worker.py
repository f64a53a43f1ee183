"""One variant per worker process: every way a variant can fail ends in its status, never in ours."""
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarker.check import LaunchError
from benchmarker.worker import Stage, WorkerAborted, abort_all, benchmark, out_of_memory
from shared.hardware import interpreted
from shared.ops import rmsnorm
from shared.schemas import Campaign, Incumbent, KernelKey, VariantReady, WeightedShape
from shared.variants import render, variant_id

PROFILE = [WeightedShape(shape=[4, 256], weight=3.0), WeightedShape(shape=[2, 512], weight=1.0)]
REPS = 3
TIMEOUT_S = 120.0  # generous: a loaded machine runs the interpreter slowly

BASELINE = render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT)
FAST_PARAMS = {"BLOCK": 1024, "ROWS": 2, "num_warps": 4}

# The kernel loads from 2^40 elements past x: unmapped memory in the interpreter, a faulting address
# on a GPU. A real kernel bug and a deterministic death without any import beyond torch and triton.
SEGFAULT = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _wild(X, Y, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    tl.store(Y + cols, tl.load(X + cols + (1 << 40)))


def launch(x, weight, eps=1e-6):
    y = torch.empty_like(x)
    _wild[(1,)](x, y, BLOCK=16)
    return y
'''

SPINS = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _never(X):
    pass


def launch(x, weight, eps=1e-6):
    while True:
        pass
    _never[(1,)](x)
'''


def _variant(source: str, params: dict | None = None, op: str = "rmsnorm", incumbent: Incumbent | None = None,
             profile: list[WeightedShape] = PROFILE) -> VariantReady:
    params = params or {}
    key = KernelKey(hardware="cpu-interpreter", op=op, dtype="float16", bucket="h256-r16")
    campaign = Campaign(key=key, profile=profile, incumbent=incumbent or Incumbent())
    return VariantReady(campaign=campaign, variant_id=variant_id(source, params), source=source, params=params,
                        strategy="grid", round=0, round_size=4)


def _edit(source: str, old: str, new: str) -> str:
    assert old in source, f"source lacks {old!r}"
    return source.replace(old, new)


def test_good_variant_is_ok_with_timings_on_every_profile_shape(tmp_path):
    stages: list[Stage] = []
    variant = _variant(render(rmsnorm.TEMPLATE, FAST_PARAMS), FAST_PARAMS)
    result = benchmark(variant, REPS, TIMEOUT_S, tmp_path, stages.append)
    assert result.status == "ok", result.error
    assert [t.shape for t in result.timings] == [ws.shape for ws in PROFILE]
    assert [t.weight for t in result.timings] == [ws.weight for ws in PROFILE]
    assert all(t.candidate_us > 0 and t.incumbent_us > 0 for t in result.timings)
    assert result.speedup_ci_low <= result.weighted_speedup <= result.speedup_ci_high
    assert result.event_id == f"result-{variant.variant_id}-{variant.campaign.campaign_id}"
    assert result.error is None and result.method
    assert "nothing deployed" in result.incumbent
    assert [s.name for s in stages] == ["compile", "check", "time", "time"]
    assert all(s.end_ns >= s.start_ns for s in stages)


def test_deployed_incumbent_is_what_the_candidate_is_timed_against(tmp_path):
    deployed = Incumbent(variant_id=variant_id(BASELINE, rmsnorm.DEFAULT), source=BASELINE, params=rmsnorm.DEFAULT)
    variant = _variant(render(rmsnorm.TEMPLATE, FAST_PARAMS), FAST_PARAMS, incumbent=deployed,
                       profile=[WeightedShape(shape=[2, 256], weight=1.0)])
    result = benchmark(variant, REPS, TIMEOUT_S, tmp_path)
    assert result.status == "ok", result.error
    assert deployed.variant_id in result.incumbent


@pytest.mark.parametrize("source", ["def launch(x, weight:\n", "import os\n" + BASELINE])
def test_syntax_error_and_banned_import_are_rejected_before_running(source, tmp_path):
    result = benchmark(_variant(source), REPS, TIMEOUT_S, tmp_path)
    assert result.status == "rejected"
    assert "syntax" in result.error or "import of os" in result.error
    assert result.timings == []


def test_unknown_op_is_rejected_naming_the_field(tmp_path):
    result = benchmark(_variant(BASELINE, rmsnorm.DEFAULT, op="gelu"), REPS, TIMEOUT_S, tmp_path)
    assert result.status == "rejected"
    assert "campaign.key" in result.error and "gelu" in result.error


def test_kernel_that_cannot_compile_is_a_compile_error(tmp_path):
    # tl.arange needs a power-of-2 length
    source = _edit(BASELINE, "cols = tl.arange(0, BLOCK)", "cols = tl.arange(0, BLOCK - 1)")
    result = benchmark(_variant(source, rmsnorm.DEFAULT), REPS, TIMEOUT_S, tmp_path)
    assert result.status == "compile_error"
    assert "power of 2" in result.error


def test_variant_that_forgets_the_weight_is_incorrect(tmp_path):
    source = _edit(BASELINE, "(x * rstd * w)", "(x * rstd)")
    result = benchmark(_variant(source, rmsnorm.DEFAULT), REPS, TIMEOUT_S, tmp_path)
    assert result.status == "incorrect"
    assert "shape" in result.error and "trial" in result.error
    assert result.weighted_speedup is None


def test_launcher_that_never_returns_times_out_and_is_killed(tmp_path):
    start = time.monotonic()
    result = benchmark(_variant(SPINS), REPS, 3.0, tmp_path)
    assert result.status == "timeout"
    assert "compile" in result.error  # the stage it was in when killed
    assert time.monotonic() - start < 3.0 + 15.0


def test_kernel_reading_wild_memory_crashes_its_worker_only(tmp_path):
    result = benchmark(_variant(SEGFAULT), REPS, TIMEOUT_S, tmp_path)
    assert result.status == "crashed"
    if interpreted():
        assert "SIGSEGV" in result.error


def test_launcher_that_exits_the_process_is_a_crash(tmp_path):
    source = _edit(BASELINE, "    shape = x.shape\n", "    shape = x.shape\n    raise SystemExit(3)\n")
    result = benchmark(_variant(source, rmsnorm.DEFAULT), REPS, TIMEOUT_S, tmp_path)
    assert result.status == "crashed"
    assert "code 3" in result.error


def test_shutdown_abort_raises_so_the_variant_is_redelivered_not_reported(tmp_path):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(benchmark, _variant(SPINS), REPS, 60.0, tmp_path)
        time.sleep(1.0)  # the worker starts spinning in its compile stage
        abort_all()
        with pytest.raises(WorkerAborted):
            running.result(timeout=30)


def test_result_carries_the_sha256_of_the_source_the_worker_executed(tmp_path):
    variant = _variant(render(rmsnorm.TEMPLATE, FAST_PARAMS), FAST_PARAMS,
                       profile=[WeightedShape(shape=[2, 256], weight=1.0)])
    result = benchmark(variant, REPS, TIMEOUT_S, tmp_path)
    assert result.status == "ok", result.error
    assert result.measured_sha256 == hashlib.sha256(variant.source.encode()).hexdigest()


def test_variant_that_eats_memory_hits_the_workers_limit_and_is_a_crash(tmp_path):
    source = _edit(BASELINE, "    shape = x.shape\n",
                   "    shape = x.shape\n    hoard = []\n    while True:\n"
                   "        hoard.append(torch.ones(1 << 28, dtype=torch.int8))\n")
    memory_gb = 1.5 if interpreted() else 8.0  # a CUDA worker's threads and context need more to start
    result = benchmark(_variant(source, rmsnorm.DEFAULT), REPS, TIMEOUT_S, tmp_path, memory_gb=memory_gb)
    assert result.status == "crashed"
    assert "out of memory" in result.error and f"{memory_gb:g} GiB" in result.error


def test_out_of_memory_is_recognised_through_the_launch_error_that_wraps_it():
    try:
        try:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 268435456 bytes")
        except RuntimeError as e:
            raise LaunchError("launch raised on shape 3x1000") from e
    except LaunchError as wrapped:
        assert out_of_memory(wrapped)
    assert not out_of_memory(ValueError("BLOCK must be a power of 2"))


def test_workers_on_one_device_check_side_by_side_but_time_alone(tmp_path):
    """Three benchmarks at once, as three replicas on one device run them: every timed stage
    overlaps no stage of another worker (the lock holds out their checks too), and each variant
    still gets its verdict."""
    params = [FAST_PARAMS, {"BLOCK": 512, "ROWS": 1, "num_warps": 4}, {"BLOCK": 256, "ROWS": 4, "num_warps": 2}]
    stages: list[list[Stage]] = [[], [], []]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(benchmark, _variant(render(rmsnorm.TEMPLATE, p), p), REPS, TIMEOUT_S, tmp_path,
                               stages[i].append) for i, p in enumerate(params)]
        results = [f.result(timeout=300) for f in futures]
    assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]
    for i, mine in enumerate(stages):
        others = [s for j, theirs in enumerate(stages) if j != i for s in theirs]
        for timed in (s for s in mine if s.name == "time"):
            clash = [s for s in others if s.start_ns < timed.end_ns and timed.start_ns < s.end_ns]
            assert not clash, (timed, clash)
    checks = [next(s for s in mine if s.name == "check") for mine in stages]
    assert any(a.start_ns < b.end_ns and b.start_ns < a.end_ns for a in checks for b in checks if a is not b), \
        "checks of different workers should run side by side"
