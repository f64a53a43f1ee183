"""The Llama demo's pure parts: which workload `up --demo` runs on which device, the per-key summary
(phase of first traffic, time per call before and after, time from the phase's start to the deploy)
on constructed windows and deploy records, and the transformers stack built, patched and stepped."""
from datetime import datetime, timedelta, timezone

import pytest
import torch

from kernelloop.cli import build_parser
from observer.demos.llama import PRESETS, TRAFFIC, LlamaConfig, fit
from observer.demos.llama_demo import choose_workload, first_phase, format_summary, summarise
from observer.sdk.hotswap import DeployRecord, Withdrawal
from shared.schemas import KernelKey, KernelStats

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
HW = "nvidia-h100-80gb-hbm3"


@pytest.mark.parametrize("argv, device, chosen", [
    ([], "cpu", "rmsnorm"),
    ([], "cuda", "llama"),
    (["--workload", "rmsnorm"], "cuda", "rmsnorm"),
    (["--workload", "llama"], "cpu", "llama"),
])
def test_up_demo_runs_llama_on_cuda_and_rmsnorm_elsewhere_unless_told(argv, device, chosen):
    args = build_parser().parse_args(["up", "--demo", *argv])
    assert choose_workload(args.workload, device) == chosen


def test_up_demo_leaves_phase_deadline_and_dtype_to_the_workload():
    args = build_parser().parse_args(["up", "--demo"])
    chosen = (args.model, args.preset, args.phase_s, args.deadline_s, args.dtype)
    assert chosen == ("kernelloop", None, None, None, None)
    args = build_parser().parse_args(["up", "--demo", "--workload", "llama", "--model", "hf", "--phase-s", "60"])
    assert (args.model, args.phase_s) == ("hf", 60.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--demo", "--workload", "gemma"])


def test_phases_fit_the_context_of_the_tiny_preset():
    decode, _, prefill = (fit(p, PRESETS["tiny"]) for p in TRAFFIC)
    assert (decode.seq, decode.start_pos) == (1, 255)
    assert (prefill.seq, prefill.start_pos) == (256, 0)
    assert fit(TRAFFIC[2], PRESETS["8b"]) == TRAFFIC[2]


def window(key: str, start_s: float, calls: int, sampled: int, time_us: float, variant: str | None = None,
           window_s: float = 2.0) -> KernelStats:
    op, dtype, bucket = key.split(".")
    return KernelStats(key=KernelKey(hardware=HW, op=op, dtype=dtype, bucket=bucket), source="host:1",
                       window_start=T0 + timedelta(seconds=start_s), window_s=window_s, calls=calls,
                       sampled_calls=sampled, sampled_time_us=time_us, variant_id=variant)


def deploy(key: str, at_s: float, variant: str = "v1", speedup: float = 5.0) -> DeployRecord:
    return DeployRecord(f"{HW}.{key}", variant, speedup, f"camp-{variant}", "ab" * 16, 3, T0 + timedelta(seconds=at_s))


PHASES = [("decode b1", T0.timestamp() + 1.0), ("decode b32", T0.timestamp() + 91.0)]


def test_a_key_is_timed_from_the_start_of_the_phase_that_brought_it_to_its_first_deploy():
    norm_b1, norm_b32 = "rmsnorm.bfloat16.h4096-r16", "rmsnorm.bfloat16.h4096-r256"
    lm_head = "matmul.bfloat16.n128256-k4096-m1"
    windows = [
        window(norm_b1, 0.0, 40, 10, 300.0),  # opened before phase 1, closed in it: phase 1
        window(lm_head, 0.0, 40, 10, 3500.0),
        window(norm_b1, 60.0, 40, 10, 60.0, "v1"),
        window(norm_b1, 90.0, 20, 4, 24.0, "v1"),  # closed at 92 s, in phase 2: still phase 1's key
        window(norm_b32, 90.0, 20, 5, 200.0),
        window(norm_b32, 92.0, 40, 10, 400.0),
        window(lm_head, 92.0, 40, 10, 3600.0),
        window(norm_b32, 180.0, 40, 10, 80.0, "v2"),
    ]
    deploys = [deploy(norm_b1, 41.5, "v0", 4.0), deploy(norm_b1, 50.0, "v1", 6.0), deploy(norm_b32, 170.0, "v2")]
    summary = summarise(windows, deploys, PHASES, interpreter=False)
    rows = {r["key"].split(".", 1)[1]: r for r in summary["keys"]}
    assert [r["key"].split(".", 1)[1] for r in summary["keys"]] == [norm_b1, lm_head, norm_b32]

    b1 = rows[norm_b1]
    assert (b1["phase"], b1["calls"]) == ("decode b1", 100)
    assert b1["before_us_per_call"] == pytest.approx(30.0)
    assert b1["after_us_per_call"] == pytest.approx(84.0 / 14)  # the last deploy's windows
    assert (b1["variant_id"], b1["speedup"]) == ("v1", 6.0)  # the last deploy serves
    assert b1["traffic_to_served_s"] == pytest.approx(40.5) and b1["within_target"]  # from the first deploy

    b32 = rows[norm_b32]
    assert b32["phase"] == "decode b32" and b32["before_us_per_call"] == pytest.approx(40.0)
    assert b32["traffic_to_served_s"] == pytest.approx(79.0) and b32["measured_speedup"] == pytest.approx(5.0)

    head = rows[lm_head]
    assert (head["phase"], head["variant_id"], head["traffic_to_served_s"], head["within_target"]) == \
        ("decode b1", None, None, None)
    assert head["calls"] == 80 and head["after_us_per_call"] is None

    table = format_summary(summary)
    assert "| 40.5 s |" in table and "| 79.0 s |" in table and "none deployed" in table
    assert "2 key(s) deployed and served; 2 within 120 s" in table


def test_a_deploy_past_the_target_or_older_than_the_traffic_is_reported_as_such():
    late, stale = "rotary.bfloat16.d128-h8-t16", "silu_and_mul.bfloat16.h28672-r16"
    windows = [window(late, 0.0, 10, 2, 40.0), window(stale, 0.0, 10, 2, 40.0, "old")]
    summary = summarise(windows, [deploy(late, 150.0), deploy(stale, -30.0, "old")], PHASES, interpreter=False)
    rows = {r["key"].split(".", 1)[1]: r for r in summary["keys"]}
    assert rows[late]["traffic_to_served_s"] == pytest.approx(149.0) and rows[late]["within_target"] is False
    assert rows[stale]["variant_id"] == "old" and rows[stale]["traffic_to_served_s"] is None
    assert "1 key(s) deployed and served; 0 within 120 s" in format_summary(summary)


def test_a_deploy_the_registry_withdrew_is_reported_with_why_and_what_it_served():
    slow, kept = "matmul.bfloat16.n4096-k4096-m1", "rmsnorm.bfloat16.h4096-r16"
    windows = [window(slow, 0.0, 40, 10, 1200.0), window(slow, 60.0, 40, 10, 1500.0, "gemv"),
               window(slow, 80.0, 40, 10, 1200.0), window(kept, 0.0, 40, 10, 300.0),
               window(kept, 60.0, 40, 10, 60.0, "v1")]
    back = Withdrawal(f"{HW}.{slow}", "gemv", None, "deleted from the registry", T0 + timedelta(seconds=75))
    earlier = Withdrawal(f"{HW}.{kept}", "v0", "v1", "rolled back (erin)", T0 + timedelta(seconds=40))
    summary = summarise(windows, [deploy(slow, 50.0, "gemv", 1.2), deploy(kept, 50.0)], PHASES, interpreter=False,
                        withdrawals=[back, earlier])
    rows = {r["key"].split(".", 1)[1]: r for r in summary["keys"]}
    assert rows[slow]["withdrawn"] == "deleted from the registry"
    assert rows[slow]["after_us_per_call"] == pytest.approx(150.0), "what it served while it served"
    assert rows[slow]["before_us_per_call"] == pytest.approx(120.0)
    assert rows[kept]["withdrawn"] is None, "an older variant's withdrawal is not the last deploy's"
    table = format_summary(summary)
    assert "| gemv (withdrawn: deleted from the registry) |" in table
    assert f"1 of them withdrawn since (the fallback or an earlier variant serves them again): {HW}.{slow}" in table


def test_a_window_belongs_to_the_last_phase_started_before_it_closed():
    assert first_phase(window("rmsnorm.float16.h64-r16", -5.0, 1, 0, 0.0), PHASES) == 0
    assert first_phase(window("rmsnorm.float16.h64-r16", 89.5, 1, 0, 0.0, window_s=1.0), PHASES) == 0
    assert first_phase(window("rmsnorm.float16.h64-r16", 89.5, 1, 0, 0.0, window_s=2.0), PHASES) == 1


def test_the_transformers_stack_is_patched_and_decodes_and_prefills_on_the_cpu():
    pytest.importorskip("transformers")
    from observer.demos.hf_llama import HfLlama

    config = LlamaConfig(hidden=64, intermediate=96, heads=2, kv_heads=1, head_dim=32, layers=1, vocab=80,
                         max_context=64)
    model = HfLlama(config, device="cpu", dtype=torch.float32)
    assert sorted(model.report.swapped.values()) == ["rmsnorm", "rmsnorm", "rmsnorm", "rotary", "silu_and_mul"]
    assert model.report.left == {}
    assert "stay torch's matmuls" in model.describe()
    tokens = torch.randint(0, config.vocab, (3, 1), generator=torch.Generator().manual_seed(0))
    first, again = model(tokens, 16), model(tokens, 16)
    assert first.shape == (3, config.vocab) and torch.isfinite(first).all()
    assert torch.equal(first, again)  # every decode step attends over the same cache: the same work
    assert model(torch.zeros(1, 8, dtype=torch.long), 0).shape == (1, config.vocab)
    with pytest.raises(ValueError, match="position 0"):
        model(torch.zeros(1, 8, dtype=torch.long), 4)
