"""The demo on a Llama-style decoder stack: random weights, every norm, projection, rotary and SwiGLU
through kernelloop's ops (observer/demos/llama.py), or transformers' LlamaForCausalLM patched by
kernelloop.patch (observer/demos/hf_llama.py), serving traffic that shifts from decode at batch 1 to
decode at batch 32 to prefills of 2k tokens. It reports, per kernel key, the time from the key's
first traffic (its phase's start) to its deployed variant serving here; the target is 120 s."""
import queue
import time
from datetime import datetime, timezone

import torch

from observer.demos.demo import (duration, fallback_name, per_call_us, report, run_in_loop, speedup_text,
                                 traced_deploys, us_text, variant_text, withdrawn)
from observer.demos.llama import PRESETS, TRAFFIC, Llama, fit
from observer.sdk.hotswap import DeployRecord, Withdrawal
from observer.sdk.runtime import Runtime
from shared import hardware
from shared.ops import torch_dtype
from shared.schemas import KernelStats
from shared.settings import Settings

WORKLOADS = ("rmsnorm", "llama")
MODELS = ("kernelloop", "hf")
TARGET_S = 120.0  # from a key's first traffic to its validated deploy serving it

# Ops whose kernels beat torch on a GPU by several times (docs/results/ops-*.md): the demo waits for
# their keys' deploys. Matmuls gain 0-16 % over cuBLAS at best, so most of their campaigns do not
# start (see LLAMA_ENV) and none is waited for.
EXPECTED_OPS = ("rmsnorm", "rmsnorm_residual", "rotary", "silu_and_mul")

# The loop's pace for the Llama demo. Each phase brings about ten keys (five row-wise, five matmul
# shapes incl. lm_head), and one benchmarker serves their campaigns one variant at a time, so:
# - KERNELLOOP_MIN_EXPECTED_GAIN 0.15: the hypothesis stage starts a campaign only when the key's
#   time share of its op times its roofline headroom reaches 15 %. Estimated from the H100 figures
#   in docs/results/ops-*.md and e2e-*.md: a row-wise key is the whole of its op's time in a phase,
#   far from its roofline (gain 0.2-1.0; the lowest is rotary's 8-head key in prefill, a quarter of
#   rotary's time there); a matmul shape holds a tenth to a half of matmul's time at 55-90 % of the
#   roofline (gain 0.01-0.13), a campaign that would hold the benchmarker a minute and deploy
#   nothing (cuBLAS wins). The threshold keeps the one benchmarker's queue to the campaigns that pay.
# - 4 variants a round, 2 rounds, 3 benchmark workers: on an H100 a variant takes a worker 5-7 s,
#   4-5 s of it compiling and checking (Triton compiles each shape specialization anew), ~0.1 s
#   timing. Three workers compile and check side by side and time one at a time
#   (benchmarker/devicelock.py), so a round of 4 takes ~10 s instead of ~25 s. Round 0 starts
#   from points that won before and spreads the rest over the op's space; almost any of them
#   beats eager torch by 2-6x on these ops, so it deploys; round 1 is there for when it does not.
# - 2 s windows and 2 confirming windows: a shift is detected in about 6 s.
# - 20 timing repetitions: timing is ~15 ms of a variant's 2 s on a GPU; more repetitions narrow
#   the confidence interval the gate reads.
# - Canaries of 0.5 s slots: a phase's ten deploys are canaried one at a time on the one GPU, and at
#   20 steps/s a slot holds ten steps, each calling a key once per layer; a verdict needs 6 windows
#   (6 s). A canary left without traffic (its phase over) is withdrawn after 60 s, not the default 180.
LLAMA_ENV = {"KERNELLOOP_WINDOW_S": "2", "KERNELLOOP_CONFIRM_WINDOWS": "2", "KERNELLOOP_BENCH_REPS": "20",
             "KERNELLOOP_VARIANTS_PER_ROUND": "4", "KERNELLOOP_ROUNDS": "2", "KERNELLOOP_MIN_EXPECTED_GAIN": "0.15",
             "KERNELLOOP_BENCH_WORKERS": "3", "KERNELLOOP_CANARY_SLOT_S": "0.5", "KERNELLOOP_CANARY_MAX_S": "60"}

# Three phases of 150 s, so that a phase's campaigns finish inside it and its deploys serve long
# enough for the detector's check against what they replaced; the workload stops at 470 s (~8 min
# with the services' start and stop). At 90 s a phase an H100 deployed 16 of 17 keys within 120 s, but
# a freshly started H200 host compiled slower and most of phase 1's deploys landed after it ended
# (docs/results/demo-nvidia-h200.md).
PHASE_S, DEADLINE_S = 150.0, 470.0
# A paced server (20 steps/s): a prefill of 2k keeps the GPU ~15 % busy, so the benchmarker,
# which shares the GPU, times variants on a mostly idle device.
STEP_INTERVAL_S = 0.05


def choose_workload(requested: str, device: str) -> str:
    """`--workload auto` is the Llama stack where CUDA is, the rmsnorm demo elsewhere (the
    interpreter runs a decoder stack far too slowly for a demo)."""
    if requested == "auto":
        return "llama" if device == "cuda" else "rmsnorm"
    if requested not in WORKLOADS:
        raise ValueError(f"workload {requested!r} is not one of auto, {', '.join(WORKLOADS)}")
    return requested


def build_model(model: str, preset: str, device: str, dtype: str):
    """The stack serving the demo: observer/demos/llama.py on kernelloop.ops, or transformers' patched."""
    from observer.sdk import ops

    config = PRESETS[preset]
    if model == "hf":
        from observer.demos.hf_llama import HfLlama

        return HfLlama(config, device=device, dtype=torch_dtype(dtype))
    if model != "kernelloop":
        raise ValueError(f"model {model!r} is not one of {', '.join(MODELS)}")
    return Llama(config, ops=ops, device=device, dtype=torch_dtype(dtype))


def first_phase(window: KernelStats, phase_starts: list[tuple[str, float]]) -> int:
    """Index of the phase a window's calls were made in: the last phase started before the window
    closed (a key's first window closes in the phase that brought it, unless a phase is shorter
    than a window)."""
    closed = window.window_start.timestamp() + window.window_s
    index = 0
    for i, (_, started) in enumerate(phase_starts):
        if started <= closed:
            index = i
    return index


def summarise(windows: list[KernelStats], deploys: list[DeployRecord], phase_starts: list[tuple[str, float]],
              interpreter: bool, target_s: float = TARGET_S, withdrawals: list[Withdrawal] = ()) -> dict:
    """Per key that had calls, in order of first traffic: its phase, calls, time per call served by
    the fallback and by the (last) deployed variant, whether the registry withdrew that variant
    since, and the seconds from its phase's start to its first deploy here. A deploy older than the
    key's traffic (a registry kept from an earlier run) has no such time."""
    first: dict[str, KernelStats] = {}
    for w in sorted(windows, key=lambda w: w.window_start):
        if w.calls:
            first.setdefault(str(w.key), w)
    rows = []
    for key, window in first.items():
        mine = [w for w in windows if str(w.key) == key]
        phase = first_phase(window, phase_starts) if phase_starts else None
        mine_deploys = [d for d in deploys if d.key == key]
        deploy = mine_deploys[-1] if mine_deploys else None
        before = per_call_us([w for w in mine if w.variant_id is None])
        after = per_call_us([w for w in mine if deploy and w.variant_id == deploy.variant_id])
        traffic_at = phase_starts[phase][1] if phase is not None else None
        to_deploy = None
        if mine_deploys and traffic_at is not None and mine_deploys[0].time.timestamp() >= traffic_at:
            to_deploy = mine_deploys[0].time.timestamp() - traffic_at
        rows.append({
            "key": key,
            "op": window.key.op,
            "phase": phase_starts[phase][0] if phase is not None else None,
            "calls": sum(w.calls for w in mine),
            "before_us_per_call": before,
            "after_us_per_call": after,
            "measured_speedup": before / after if before and after else None,
            "variant_id": deploy.variant_id if deploy else None,
            "speedup": deploy.speedup if deploy else None,
            "campaign_id": deploy.campaign_id if deploy else None,
            "trace_id": deploy.trace_id if deploy else None,
            "first_traffic": datetime.fromtimestamp(traffic_at, timezone.utc).isoformat() if traffic_at else None,
            "served_at": mine_deploys[0].time.isoformat() if mine_deploys else None,
            "traffic_to_served_s": to_deploy,
            "within_target": to_deploy <= target_s if to_deploy is not None else None,
            "withdrawn": withdrawn(key, deploy, withdrawals),
        })
    return {"workload": "llama", "interpreter": interpreter, "target_s": target_s, "keys": rows}


def format_summary(summary: dict) -> str:
    """A markdown table of summarise()'s result, and how many deploys met the target."""
    lines = ["| key | phase | calls | before us/call (fallback) | after us/call | variant | speedup (benchmark) "
             "| speedup (served) | traffic to served |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in summary["keys"]:
        took = f"{r['traffic_to_served_s']:.1f} s" if r["traffic_to_served_s"] is not None else "-"
        lines.append(f"| {r['key']} | {r['phase'] or '-'} | {r['calls']} | {us_text(r['before_us_per_call'])} "
                     f"| {us_text(r['after_us_per_call'])} | {variant_text(r)} "
                     f"| {speedup_text(r['speedup'])} "
                     f"| {speedup_text(r['measured_speedup'])} | {took} |")
    timed = [r for r in summary["keys"] if r["traffic_to_served_s"] is not None]
    met = sum(1 for r in timed if r["within_target"])
    lines.append(f"\n{len(timed)} key(s) deployed and served; {met} within {summary['target_s']:.0f} s of their "
                 "first traffic (their phase's start).")
    if taken := [r for r in summary["keys"] if r.get("withdrawn")]:
        lines.append(f"{len(taken)} of them withdrawn since (the fallback or an earlier variant serves them again): "
                     + ", ".join(f"{r['key']} ({r['withdrawn']})" for r in taken) + ".")
    if summary["interpreter"]:
        lines.append("Times measure the Triton interpreter on the CPU, not a GPU: they show the loop "
                     "working, not GPU kernel speed.")
    else:
        lines.append("Per-call times are the SDK's sampled device-event times in a paced server: they include "
                     "launch latency where the GPU waits on the host, so they are not kernel times.")
    return "\n".join(lines)


def _sync(logits: torch.Tensor) -> None:
    if logits.is_cuda:
        torch.cuda.synchronize()  # a server reads each step's logits before the next step


def run_llama_demo(runtime: Runtime, model, phases=TRAFFIC, phase_s: float = PHASE_S,
                   deadline_s: float = DEADLINE_S, step_interval_s: float = STEP_INTERVAL_S,
                   wait_ops=EXPECTED_OPS, echo=print) -> dict:
    """Each phase's steps for phase_s; the last goes on until every key of wait_ops seen has a deploy
    here and the last phase's have served a window, or until deadline_s after the first phase's
    start. Returns summarise()'s dict."""
    interpreter = hardware.interpreted()
    windows: list[KernelStats] = []
    arrived: queue.Queue = queue.Queue()
    runtime.window_listeners.append(arrived.put)
    phase_starts: list[tuple[str, float]] = []
    device = model.embed.device if isinstance(model, Llama) else model.device
    g = torch.Generator().manual_seed(0)

    firsts: dict[str, KernelStats] = {}  # key -> its first window with calls
    served: dict[str, str] = {}  # key -> the deployed variant its windows last named

    def drain() -> None:
        """One line per window (many keys each), and a line for each new key and each swap."""
        while not arrived.empty():
            batch = arrived.get_nowait()
            for stats in batch:
                key, name = str(stats.key), f"{stats.key.op}.{stats.key.dtype}.{stats.key.bucket}"
                windows.append(stats)
                if stats.calls and key not in firsts:
                    firsts[key] = stats
                    echo(f"  new key {name} ({phase_starts[-1][0] if phase_starts else 'before phase 1'})")
                if stats.variant_id and served.get(key) != stats.variant_id:
                    served[key] = stats.variant_id
                    before = per_call_us([w for w in windows if w.key == stats.key and w.variant_id is None])
                    now = stats.time_us_per_call
                    echo(f"  {name} now served by {stats.variant_id}: "
                         f"{duration(now).strip() + '/call' if now else '(no sample yet)'}, fallback "
                         f"{duration(before).strip() + '/call' if before else '-'}")
            if batch:
                on_variants = sum(1 for s in batch if s.variant_id)
                echo(f"window {batch[0].window_start:%H:%M:%S}  {len(batch)} keys, "
                     f"{sum(s.calls for s in batch):,} calls; {on_variants} served by deployed variants, "
                     f"{len(batch) - on_variants} by the fallback")

    def waiting_for() -> list[str]:
        """Keys of wait_ops still without a deploy here (the last phase's: without a served window)."""
        deployed = {d.key: d.variant_id for d in runtime.deploys}
        last = len(phase_starts) - 1
        return [key for key, w in firsts.items() if w.key.op in wait_ops and (
            key not in deployed or (first_phase(w, phase_starts) == last and served.get(key) != deployed[key]))]

    started = time.monotonic()
    try:
        for i, phase in enumerate(phases):
            last = i == len(phases) - 1
            phase = fit(phase, model.config)
            tokens = torch.randint(0, model.config.vocab, (phase.batch, phase.seq), generator=g).to(device)
            phase_starts.append((phase.name, time.time()))
            echo(f"phase {i + 1}: {phase.name} (batch {phase.batch}, {phase.seq} token(s) at position "
                 f"{phase.start_pos})")
            until = time.monotonic() + phase_s
            while time.monotonic() < started + deadline_s:
                if time.monotonic() >= until and (not last or not waiting_for()):
                    break
                step_started = time.monotonic()
                with torch.no_grad():
                    _sync(model(tokens, phase.start_pos))
                drain()
                time.sleep(max(0.0, step_interval_s - (time.monotonic() - step_started)))
            else:
                echo(f"deadline of {deadline_s:.0f} s passed; still waiting for: {', '.join(waiting_for()) or '-'}")
                break
    finally:
        runtime.window_listeners.remove(arrived.put)
    drain()
    return summarise(windows, list(runtime.deploys), phase_starts, interpreter, withdrawals=list(runtime.withdrawals))


def run_llama_demo_loop(settings: Settings, nats_url: str | None = None, model: str = "kernelloop",
                        preset: str | None = None, dtype: str | None = None, phase_s: float | None = None,
                        deadline_s: float | None = None, echo=print) -> int:
    """`kernelloop up --demo --workload llama`: the model is built first (a missing transformers or
    a full GPU fails before anything starts), then the loop and the traffic as run_demo_loop's."""
    device = hardware.device()
    preset = preset or ("8b" if device == "cuda" else "tiny")
    dtype = dtype or "bfloat16"
    echo(f"kernelloop demo: building the {preset} Llama-style stack ({model}, {dtype}) on {device}")
    served = build_model(model, preset, device, dtype)
    if model == "hf":
        echo(served.describe())
    phases = [fit(p, PRESETS[preset]) for p in TRAFFIC]
    summary, spans = run_in_loop(
        settings, nats_url, LLAMA_ENV, echo, sample_every=4,
        work=lambda runtime, echo: run_llama_demo(runtime, served, phases, phase_s or PHASE_S,
                                                  deadline_s or DEADLINE_S, echo=echo))
    fp = hardware.fingerprint()
    result = {"device": fp.name, "interpreter": fp.interpreter, "fallback": fallback_name(fp.interpreter),
              "workload": "llama", "model": model, "preset": preset, "dtype": dtype,
              "model_note": served.describe() if model == "hf" else "observer/demos/llama.py: every norm, projection, "
                            "rotary and SwiGLU through kernelloop.ops",
              "phases": [{"name": p.name, "batch": p.batch, "seq": p.seq, "start_pos": p.start_pos} for p in phases],
              "target_s": summary["target_s"], "deploys": traced_deploys(summary["keys"], spans),
              "keys": summary["keys"]}
    echo("")
    echo(format_summary(summary))
    if model == "hf":
        echo(f"model: {served.describe()}")
    return report(settings, result, echo)
