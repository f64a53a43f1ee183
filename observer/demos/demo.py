"""The demo workload: RMSNorm on one shape, then its usage shifts to another, larger one (the first
keeps a share of the calls). Each deploy starts as a canary, served by turns with the fallback until
the deployer promotes or withdraws it. The demo runs until the new shape's kernel is decided, and,
once promoted, has served two windows, with no canary left in flight (or a deadline), and returns
what each key cost per call before and after its deploy and what its canary decided."""
import argparse
import logging
import queue
import time

from observer.sdk import observe, ops
from observer.sdk.hotswap import DeployRecord, Withdrawal
from observer.sdk.runtime import Runtime
from shared import hardware
from shared.ops import get_op, torch_dtype
from shared.schemas import KernelStats
from shared.settings import Settings
from shared.telemetry import setup_tracing

OP = "rmsnorm"
# Decode-sized rows, then a wider model with more rows. Small enough that the interpreter serves a
# call in a few tens of ms and each 2 s canary slot holds several calls of each key.
SHAPES = ([8, 1024], [16, 2048])


def per_call_us(windows: list[KernelStats]) -> float | None:
    calls = sum(w.sampled_calls for w in windows)
    return sum(w.sampled_time_us for w in windows) / calls if calls else None


def duration(us: float) -> str:
    return f"{us:7.1f} us" if us < 1e3 else f"{us / 1e3:7.1f} ms"


def _describe(stats: KernelStats, interpreter: bool) -> str:
    per_call = f"{duration(stats.time_us_per_call)}/call" if stats.time_us_per_call else "    (no sample)"
    where = " (interpreter)" if interpreter else ""
    return (f"window {stats.window_start:%H:%M:%S}  {stats.key.bucket:<12} {stats.calls:4d} calls  "
            f"{per_call}{where}  served by {stats.variant_id or 'fallback'}")


def withdrawn(key: str, deploy: DeployRecord | None, withdrawals: list[Withdrawal]) -> str | None:
    """Why the registry took the key's last deploy back from serving here (a rollback after a live
    regression, say), or None while it serves."""
    if deploy is None:
        return None
    return next((w.why for w in reversed(withdrawals)
                 if w.key == key and w.variant_id == deploy.variant_id and w.time >= deploy.time), None)


def variant_text(row: dict) -> str:
    """The summary tables' variant cell: what was deployed, and whether it still serves."""
    if not row["variant_id"]:
        return "none deployed"
    if row.get("withdrawn"):
        return f"{row['variant_id']} (withdrawn: {row['withdrawn']})"
    return f"{row['variant_id']} (in its canary)" if row.get("stage") == "canary" else row["variant_id"]


def stage(deploy: DeployRecord | None, withdrawn_why: str | None) -> str | None:
    """Where the key's last deploy stands here: canary (served by turns), promoted, or withdrawn."""
    if deploy is None:
        return None
    return "withdrawn" if withdrawn_why else deploy.stage


def canary_text(row: dict) -> str:
    """The summary tables' canary cell: what the canary decided, with the step speedup it measured."""
    if not row.get("stage"):
        return "-"
    if row["stage"] == "promoted" and row.get("step_speedup"):
        return f"promoted ({row['step_speedup']:.2f}x served)"
    return row["stage"]


def summarise(windows: list[KernelStats], deploys: list[DeployRecord], keys: list[str],
              interpreter: bool, withdrawals: list[Withdrawal] = ()) -> dict:
    """Per key: calls, time per call served by the fallback and by the (last) deployed variant, and
    whether the registry withdrew that variant since."""
    rows = []
    for key in keys:
        mine = [w for w in windows if str(w.key) == key]
        deploy = next((d for d in reversed(deploys) if d.key == key), None)
        before = per_call_us([w for w in mine if w.variant_id is None])
        after = per_call_us([w for w in mine if deploy and w.variant_id == deploy.variant_id])
        why = withdrawn(key, deploy, withdrawals)
        rows.append({
            "key": key,
            "calls": sum(w.calls for w in mine),
            "before_us_per_call": before,
            "after_us_per_call": after,
            "measured_speedup": before / after if before and after else None,
            "variant_id": deploy.variant_id if deploy else None,
            "speedup": deploy.speedup if deploy else None,
            "campaign_id": deploy.campaign_id if deploy else None,
            "trace_id": deploy.trace_id if deploy else None,
            "withdrawn": why,
            "stage": stage(deploy, why),
            "step_speedup": deploy.step_speedup if deploy else None,
        })
    return {"op": OP, "interpreter": interpreter, "keys": rows}


def us_text(v: float | None) -> str:
    """A per-call time for the summary tables, or - when there is none."""
    return f"{v:,.0f}" if v is not None else "-"


def speedup_text(v: float | None) -> str:
    """A speedup for the summary tables, or - when there is none."""
    return f"{v:.2f}x" if v is not None else "-"


def format_summary(summary: dict) -> str:
    """A markdown table of summarise()'s result."""
    lines = ["| key | calls | before us/call (fallback) | after us/call | variant | speedup (benchmark) "
             "| speedup (served) | canary | trace |", "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in summary["keys"]:
        lines.append(f"| {r['key']} | {r['calls']} | {us_text(r['before_us_per_call'])} "
                     f"| {us_text(r['after_us_per_call'])} | {variant_text(r)} "
                     f"| {speedup_text(r['speedup'])} | {speedup_text(r['measured_speedup'])} "
                     f"| {canary_text(r)} | {r['trace_id'] or '-'} |")
    if summary["interpreter"]:
        lines.append("\nTimes measure the Triton interpreter on the CPU, not a GPU: they show the loop "
                     "working, not GPU kernel speed.")
    return "\n".join(lines)


def run_demo(runtime: Runtime, phase_s: float = 60.0, shapes=SHAPES, dtype: str = "float16",
             deadline_s: float = 900.0, calls_per_window: int = 30, echo=print) -> dict:
    """Phase 1 calls ops.rmsnorm on shapes[0] for phase_s; phase 2 on shapes[1], and on the earlier
    shape too (usage shifts, the old traffic does not vanish: a kernel deployed for it meanwhile has
    calls for its canary), until the last key's deploy is decided here (withdrawn, or promoted and
    then served two windows) and no canary is in flight here, or deadline_s into phase 2. Returns
    summarise()'s dict."""
    op = get_op(OP)
    interpreter = hardware.interpreted()
    device = hardware.device()
    windows: list[KernelStats] = []
    arrived: queue.Queue = queue.Queue()
    runtime.window_listeners.append(arrived.put)
    keys = [runtime.dispatcher.key(OP, dtype, op.shape_bucket(s)) for s in shapes]
    pause_s = runtime.window_s / calls_per_window  # paced, so the workload leaves the CPU to others

    def drain() -> None:
        while not arrived.empty():
            for stats in arrived.get_nowait():
                windows.append(stats)
                echo(_describe(stats, interpreter))

    def decided(key: str) -> bool:
        """The key's deploy is withdrawn here, or promoted and has served two windows since."""
        deploy = next((d for d in reversed(runtime.deploys) if d.key == key), None)
        if deploy is None or runtime.canaries:
            return False
        if withdrawn(key, deploy, runtime.withdrawals):
            return True
        if deploy.stage != "promoted" or runtime.dispatcher.serving(key) != deploy.variant_id:
            return False
        since = deploy.time.timestamp()
        return sum(1 for w in windows if str(w.key) == key and w.variant_id == deploy.variant_id
                   and w.window_start.timestamp() >= since) >= 2

    earlier = []  # the inputs of earlier phases, which keep a share of the calls
    try:
        for phase, (shape, key) in enumerate(zip(shapes, keys), start=1):
            last = phase == len(shapes)
            echo(f"phase {phase}: {OP} {shape} {dtype} ({key})")
            x, weight = op.make_inputs(shape, torch_dtype(dtype), device, seed=phase)
            ops.rmsnorm(x, weight)  # the phase's clock starts after a first call, which may load a kernel
            until = time.monotonic() + (deadline_s if last else phase_s)
            while time.monotonic() < until:
                started = time.monotonic()
                ops.rmsnorm(x, weight)
                for old in earlier:
                    ops.rmsnorm(*old)
                drain()
                if last and decided(key):
                    break
                time.sleep(max(0.0, pause_s * (1 + len(earlier)) - (time.monotonic() - started)))
            else:
                if last:
                    echo(f"phase {phase}: deadline of {deadline_s:.0f} s passed before a deploy for {key} was "
                         "decided")
            earlier.append((x, weight))
    finally:
        runtime.window_listeners.remove(arrived.put)
    drain()
    return summarise(windows, list(runtime.deploys), keys, interpreter, list(runtime.withdrawals))


# The loop's pace for the demo: short windows and modest repetitions, so a campaign on the
# interpreter finishes in minutes. Anything already set in the environment wins.
# Canary slots of 2 s hold a few interpreted calls of each key (a verdict takes 6 windows, 24 s at
# least); a canary without a verdict after 2 minutes is withdrawn, so a stuck one holds the CPU's
# other deploys no longer than that.
DEMO_ENV = {"KERNELLOOP_WINDOW_S": "2", "KERNELLOOP_CONFIRM_WINDOWS": "2", "KERNELLOOP_BENCH_REPS": "10",
            "KERNELLOOP_VARIANTS_PER_ROUND": "8", "KERNELLOOP_ROUNDS": "2", "KERNELLOOP_CANARY_SLOT_S": "2",
            "KERNELLOOP_CANARY_MAX_S": "120"}


def run_demo_loop(settings: Settings, nats_url: str | None = None, phase_s: float = 45.0, shapes=SHAPES,
                  dtype: str = "float16", deadline_s: float = 480.0, echo=print) -> int:
    """`kernelloop up --demo` on the rmsnorm workload: NATS (embedded and empty unless nats_url is
    given), the five services as processes, and the demo workload in this process; writes
    <state>/demo-summary.json."""
    # One call in four timed: interpreted calls are slow, so windows hold few calls.
    summary, spans = run_in_loop(settings, nats_url, DEMO_ENV, echo, sample_every=4,
                                 work=lambda runtime, echo: run_demo(runtime, phase_s, shapes, dtype, deadline_s,
                                                                     echo=echo))
    fp = hardware.fingerprint()
    result = {"device": fp.name, "interpreter": fp.interpreter, "fallback": fallback_name(fp.interpreter),
              "deploys": traced_deploys(summary["keys"], spans), "keys": summary["keys"]}
    echo("")
    echo(format_summary(summary))
    return report(settings, result, echo)


def fallback_name(interpreter: bool) -> str:
    return ("baseline Triton kernel (template default config) in the interpreter" if interpreter
            else "torch reference")


def traced_deploys(rows: list[dict], spans: list[dict]) -> list[dict]:
    """The rows with a deploy, each with the services its campaign's trace holds spans of."""
    from shared import traces

    return [{**row, "trace_services": traces.services_in(spans, row["trace_id"]) if row["trace_id"] else []}
            for row in rows if row["variant_id"]]


def report(settings: Settings, result: dict, echo=print) -> int:
    """Writes <state>/demo-summary.json and prints its closing lines; 0 when anything was deployed."""
    import json

    path = settings.state_dir.resolve() / "demo-summary.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    echo(f"\ncompared with: {result['fallback']}; device: {result['device']}")
    for d in result["deploys"]:
        echo(f"trace {d['trace_id']} ({d['key']}, {d.get('stage') or 'deployed'}): services "
             f"{', '.join(d['trace_services'])}  -> kernelloop trace {d['campaign_id']}")
    echo(f"summary written to {path}")
    return 0 if result["deploys"] else 1


def run_in_loop(settings: Settings, nats_url: str | None, demo_env: dict[str, str], echo, work,
                sample_every: int = 4) -> tuple[dict, list[dict]]:
    """Start NATS and the five services with demo_env (anything already set in the environment
    wins), observe this process, run work(runtime, echo), stop everything; returns work's summary
    and the spans of every trace. echo raises once a service has died."""
    import os
    import shutil

    from shared import supervisor
    from shared.telemetry import read_spans

    state_dir = settings.state_dir.resolve()
    if nats_url is None:
        shutil.rmtree(state_dir / "nats", ignore_errors=True)  # a demo starts from an empty registry
    env = {k: os.environ.get(k, v) for k, v in demo_env.items()}
    window_s = float(env.get("KERNELLOOP_WINDOW_S", settings.window_s))
    canary_slot_s = float(env.get("KERNELLOOP_CANARY_SLOT_S", settings.canary_slot_s))
    loop = supervisor.start(state_dir, nats_url=nats_url, env=env)
    try:
        loop.wait_ready()
    except BaseException:
        loop.stop()
        raise
    echo(f"kernelloop demo: NATS at {loop.nats_url}; services {', '.join(loop.processes)}; logs in {state_dir / 'logs'}")

    def watched(line: str) -> None:
        echo(line)
        if dead := loop.dead():
            raise RuntimeError(f"{', '.join(dead)} exited; see {state_dir / 'logs'}")

    # The observer SDK in this workload is the observer's part of each campaign's trace (the swap).
    provider = setup_tracing("observer", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    # The workload connects as its own user: it may publish kernel.stats and read the registry, no more.
    runtime = observe(nats_url=loop.url_for("workload"), window_s=window_s, sample_every=sample_every,
                      state_dir=state_dir, canary_slot_s=canary_slot_s)
    try:
        summary = work(runtime, watched)
    finally:
        runtime.close()
        provider.force_flush()
        time.sleep(1.0)  # the services export spans every 0.5 s
        loop.stop()
    return summary, read_spans(settings.traces_dir)


def _shape(text: str) -> list[int]:
    return [int(d) for d in text.lower().split("x")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m observer.demos.demo", description=__doc__)
    parser.add_argument("--phase-s", type=float, default=60.0, help="length of phase 1")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="longest phase 2 waits for a deploy")
    parser.add_argument("--shapes", type=_shape, nargs=2, default=list(SHAPES), metavar="ROWSxHIDDEN")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    provider = setup_tracing("workload", settings.traces_dir, settings.otel_exporter_otlp_endpoint)
    runtime = observe()
    try:
        summary = run_demo(runtime, args.phase_s, args.shapes, args.dtype, args.deadline_s)
    finally:
        runtime.close()
        provider.shutdown()
    print(format_summary(summary))
    return 0 if all(r["variant_id"] for r in summary["keys"][-1:]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
