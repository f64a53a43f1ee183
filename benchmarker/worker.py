"""Benchmarks one variant in its own process: generated code is untrusted and only ever runs there.

The child checks the source statically, loads it (the first call compiles on a GPU), checks it
against the op's reference and times it against the incumbent on every profile shape. Workers on
one device (several benchmarker replicas) compile and check side by side but time alone:
benchmarker/devicelock.py. The parent
waits with a deadline, kills a child that overruns it, reports one that dies, and builds the
BenchResult. Children fork from a server that has imported torch and triton once, so each starts
in milliseconds instead of seconds.
"""
import multiprocessing
import multiprocessing.forkserver
import resource
import secrets
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shared import hardware
from shared.ops import get_op, torch_dtype, use_user_ops, user_ops_folder
from shared.schemas import BenchResult, Campaign, ShapeTiming, VariantReady
from shared.variants import load, load_measured, render, static_problems, variant_id

from benchmarker import timing
from benchmarker.devicelock import DeviceLock, device_id
from benchmarker.check import HostCompute, LaunchError, TimedCheck, check, host_compute_message, shape_text

# Imported once in the fork server, so no child pays for them.
PRELOAD = ["torch", "triton", "triton.language", "shared.ops", "shared.variants", "shared.hardware",
           "benchmarker.check", "benchmarker.timing", "benchmarker.worker"]
CHECK_TRIALS = {"cuda": 5, "cpu": 2}  # the interpreter is ~1000x slower: fewer trials there
WARMUP = {"cuda": 3, "cpu": 1}  # on a GPU the first calls compile and fill caches
N_BOOT = 1000
MEMORY_GB = 16.0  # shared/settings.py's bench_memory_gb


@dataclass
class Stage:
    """One stage of the child's work, with wall-clock times a tracer can place in the trace."""

    name: str  # compile, check or time
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


def benchmark(variant: VariantReady, reps: int, timeout_s: float, cache_dir: Path,
              on_stage: Callable[[Stage], None] | None = None, memory_gb: float = MEMORY_GB) -> BenchResult:
    """Check and time `variant` against its campaign's incumbent in a fresh process."""
    seed = secrets.randbits(31)  # fresh inputs every benchmark: a variant cannot learn them
    outcome = _run_child(variant, reps, timeout_s, Path(cache_dir), seed, on_stage or (lambda stage: None),
                         memory_gb)
    fields: dict[str, Any] = {"status": outcome["status"], "error": outcome.get("error"),
                              "measured_sha256": outcome.get("sha256")}
    if outcome["status"] == "ok":
        fields.update(_summarise(outcome["times"], seed))
    device = hardware.device()
    return BenchResult(
        event_id=result_event_id(variant),
        campaign=variant.campaign,
        variant_id=variant.variant_id,
        source=variant.source,
        params=variant.params,
        strategy=variant.strategy,
        round=variant.round,
        round_size=variant.round_size,
        incumbent=describe_incumbent(variant.campaign, device),
        hardware=hardware.fingerprint(measure=True),
        method=describe_method(reps, device),
        **fields,
    )


class WorkerAborted(RuntimeError):
    """The worker was killed by abort_all(), not by its variant: there is no verdict to publish."""


def abort_all() -> None:
    """Kill every running worker (at shutdown). Their benchmark() calls raise WorkerAborted, so the
    variants are not acked and another replica benchmarks them again."""
    with _LIVE_LOCK:
        for child in list(_LIVE):
            _ABORTED.add(child)
            child.kill()


def running_workers() -> dict[str, int]:
    """Worker process name (bench-<variant id>) -> pid, for every worker running now."""
    with _LIVE_LOCK:
        return {child.name: child.pid for child in _LIVE}


def prepare() -> None:
    """Start the fork server now (it imports torch and triton), so the first variant need not wait."""
    _context()
    multiprocessing.forkserver.ensure_running()


def result_event_id(variant: VariantReady) -> str:
    # Deterministic: a redelivered variant.ready yields the same id and JetStream drops the copy.
    event_id = f"result-{variant.variant_id}-{variant.campaign.campaign_id}"
    return event_id if len(event_id) <= 128 else f"result-{variant_id(event_id, {})}"


def describe_incumbent(campaign: Campaign, device: str) -> str:
    incumbent = campaign.incumbent
    if incumbent.source:
        vid = incumbent.variant_id or variant_id(incumbent.source, incumbent.params)
        return f"deployed variant {vid} {incumbent.params}"
    op = campaign.key.op
    if device == "cuda":
        return f"torch eager {op} (the op's fallback; nothing deployed)"
    return f"baseline Triton kernel of {op} at its default config, in the same interpreter (nothing deployed)"


def describe_method(reps: int, device: str) -> str:
    text = " ".join(timing.__doc__.split())
    where = "CUDA" if device == "cuda" else "Triton interpreter on the CPU (times measure the interpreter, not a GPU)"
    return f"{text} Here: reps={reps}, warm-up={WARMUP[device]}, {where}."


# ---- parent: one child per variant, a deadline, and a verdict when it dies ---------------------

_CONTEXT: multiprocessing.context.BaseContext | None = None
_LIVE: set = set()  # running workers, so a shutdown can end them
_ABORTED: set = set()
_LIVE_LOCK = threading.Lock()


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _run_child(variant: VariantReady, reps: int, timeout_s: float, cache_dir: Path, seed: int,
               on_stage: Callable[[Stage], None], memory_gb: float) -> dict:
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main,
                        args=(sender, variant.model_dump_json(), reps, str(cache_dir), seed, memory_gb,
                              user_ops_folder()),
                        name=f"bench-{variant.variant_id}", daemon=True)
    with _LIVE_LOCK:
        child.start()  # blocks until the fork server is up, so its start-up is outside the deadline
        _LIVE.add(child)
    sender.close()  # ours; the child's copy is the only writer left, so its death reads as EOF
    deadline = time.monotonic() + timeout_s
    current = "start-up"
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not receiver.poll(min(left, 0.5)):
                continue
            try:
                kind, payload = receiver.recv()
            except EOFError:
                child.join(5)
                if child in _ABORTED:
                    raise WorkerAborted(f"benchmark of {variant.variant_id} interrupted during {current}")
                return {"status": "crashed", "error": f"worker {_death(child.exitcode)} during {current}"}
            if kind == "begin":
                current = payload
            elif kind == "stage":
                on_stage(Stage(**payload))
            elif kind == "done":
                return payload
        return {"status": "timeout", "error": f"no result within {timeout_s:g} s; worker killed during {current}"}
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receiver.close()
        with _LIVE_LOCK:
            _LIVE.discard(child)
            _ABORTED.discard(child)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode} without a result"


def _summarise(times: list[dict], seed: int) -> dict[str, Any]:
    # times: one {shape, weight, incumbent_us: [reps], candidate_us: [reps]} per profile shape
    timings = [
        ShapeTiming(
            shape=t["shape"], weight=t["weight"],
            candidate_us=timing.median(t["candidate_us"]), candidate_spread_us=timing.iqr(t["candidate_us"]),
            incumbent_us=timing.median(t["incumbent_us"]), incumbent_spread_us=timing.iqr(t["incumbent_us"]),
            speedup=timing.median(t["incumbent_us"]) / timing.median(t["candidate_us"]),
        )
        for t in times
    ]
    speedup, low, high = timing.speedup_ci([t["incumbent_us"] for t in times], [t["candidate_us"] for t in times],
                                           [t["weight"] for t in times], n_boot=N_BOOT, seed=seed)
    return {"timings": timings, "weighted_speedup": speedup, "speedup_ci_low": low, "speedup_ci_high": high}


# ---- child: everything below runs in the worker process ----------------------------------------


def _child_main(conn, variant_json: str, reps: int, cache_dir: str, seed: int, memory_gb: float,
                user_ops: Path | None) -> None:
    limit_memory(memory_gb)
    use_user_ops(user_ops)  # a fork-server child inherits none of the parent's start-up settings
    variant = VariantReady.model_validate_json(variant_json)
    measured: dict[str, str] = {}
    try:
        outcome = _run_variant(variant, reps, Path(cache_dir), seed, conn, measured)
    except Exception as e:  # our own failure, or the device's after a bad kernel (e.g. illegal address)
        outcome = {"status": "crashed", "error": _error_text(e)}
    conn.send(("done", {**outcome, **measured}))
    conn.close()


def limit_memory(memory_gb: float) -> None:
    """Cap the host memory this process may map. RLIMIT_DATA, not RLIMIT_AS: CUDA reserves far more
    address space than it uses, and those reservations are not data."""
    limit = int(memory_gb * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def out_of_memory(error: BaseException | None) -> bool:
    """A failed allocation, on the host (past limit_memory) or on the device."""
    while error is not None:
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            return True
        if isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error)):
            return True
        error = error.__cause__
    return False


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return f"out of memory (a worker may map {_memory_text()}): {text}" if out_of_memory(e) else text


def _memory_text() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return "any amount" if soft == resource.RLIM_INFINITY else f"{soft / 2**30:g} GiB"


@contextmanager
def _stage(conn, name: str, **attributes):
    conn.send(("begin", name))
    start = time.time_ns()
    try:
        yield attributes  # the stage may add attributes as it learns them
    finally:
        conn.send(("stage", {"name": name, "start_ns": start, "end_ns": time.time_ns(), "attributes": attributes}))


def _run_variant(variant: VariantReady, reps: int, cache_dir: Path, seed: int, conn, measured: dict) -> dict:
    device = hardware.device()
    lock = DeviceLock(cache_dir / "locks", device_id(device))
    conn.send(("begin", "waiting for the device"))
    with lock.shared() as waited:
        outcome = _compile_and_check(variant, cache_dir, seed, conn, measured, device, waited)
    if outcome["status"] != "ok":
        return outcome
    conn.send(("begin", "waiting to time alone on the device"))
    with lock.exclusive() as waited:
        return _time(variant, outcome["candidate"], reps, cache_dir, seed, conn, device, waited)


def _compile_and_check(variant: VariantReady, cache_dir: Path, seed: int, conn, measured: dict, device: str,
                       waited_s: float) -> dict:
    key, profile = variant.campaign.key, variant.campaign.profile
    with _stage(conn, "compile", lock_wait_s=round(waited_s, 3)) as attrs:
        problems = static_problems(variant.source)
        if not problems and variant_id(variant.source, variant.params) != variant.variant_id:
            problems = [f"variant_id {variant.variant_id} is not the hash of its source and params"]
        if problems:
            attrs["status"] = "rejected"
            return {"status": "rejected", "error": "; ".join(problems)}
        try:
            op = get_op(key.op)
            if key.dtype not in op.DTYPES:
                raise KeyError(f"op {key.op} has no dtype {key.dtype}")
        except KeyError as e:
            attrs["status"] = "rejected"
            return {"status": "rejected", "error": f"campaign.key: {e.args[0]}"}
        dtype = torch_dtype(key.dtype)
        try:
            candidate, measured["sha256"] = load_measured(variant.source, variant.params, variant.variant_id, cache_dir)
            # The first call compiles on a GPU. No sync here: a kernel that faults the device
            # surfaces in the check, and is a crash rather than a compile error.
            candidate(*op.make_inputs(list(op.ODD_SHAPES[0]), dtype, device, seed))
        except Exception as e:
            status = "crashed" if out_of_memory(e) else "compile_error"
            attrs["status"] = status
            return {"status": status, "error": _error_text(e)}

    trials = CHECK_TRIALS[device]
    with _stage(conn, "check", trials=trials) as attrs:
        try:
            ok, message = check(candidate, op, dtype, [s.shape for s in profile], device, trials, seed)
        except HostCompute as e:  # not a kernel at all: refused like a static problem
            status, ok, message = "rejected", False, str(e)
        except LaunchError as e:
            if out_of_memory(e):
                status, ok, message = "crashed", False, _error_text(e)
            else:
                status = "compile_error" if _compile_failure(e.__cause__) else "incorrect"
                ok, message = False, str(e)
        else:
            status = "ok" if ok else "incorrect"
        attrs.update(status=status, detail=message)
        if not ok:
            return {"status": status, "error": message}
    return {"status": "ok", "candidate": candidate}


def _time(variant: VariantReady, candidate: Callable, reps: int, cache_dir: Path, seed: int, conn, device: str,
          waited_s: float) -> dict:
    key, profile = variant.campaign.key, variant.campaign.profile
    op = get_op(key.op)
    dtype = torch_dtype(key.dtype)
    try:
        incumbent = _load_incumbent(variant.campaign, op, device, cache_dir)
    except Exception as e:  # it served production, so this is the machine's problem, not the candidate's
        return {"status": "crashed", "error": f"incumbent failed to load: {type(e).__name__}: {e}"}
    times = []
    tolerance = op.TOLERANCE[key.dtype]
    for ws in profile:
        with _stage(conn, "time", shape=shape_text(ws.shape), reps=reps, lock_wait_s=round(waited_s, 3)) as attrs:
            waited_s = 0.0  # the lock is held for every shape: only the first waited
            args = op.make_inputs(ws.shape, dtype, device, seed)
            guard = TimedCheck(op, args, tolerance, seed, checked=1)  # 1: the candidate
            inc, cand = timing.time_pair(incumbent, candidate, args, reps, WARMUP[device], device, guard)
            if computed := guard.computed():
                attrs["status"] = "rejected"
                return {"status": "rejected",
                        "error": host_compute_message(computed, f"timed calls, shape {shape_text(ws.shape)}")}
            if problem := guard.verdict():
                attrs["status"] = "incorrect"
                return {"status": "incorrect", "error": f"{problem}, shape {shape_text(ws.shape)}"}
        times.append({"shape": ws.shape, "weight": ws.weight, "incumbent_us": inc, "candidate_us": cand})
    return {"status": "ok", "times": times}


def _load_incumbent(campaign: Campaign, op, device: str, cache_dir: Path) -> Callable:
    incumbent = campaign.incumbent
    if incumbent.source:  # validated when it was deployed, so no static check again
        vid = incumbent.variant_id or variant_id(incumbent.source, incumbent.params)
        return load(incumbent.source, incumbent.params, vid, cache_dir)
    if device == "cuda":
        return getattr(op, "eager", op.reference)  # what the dispatcher's fallback serves there
    # Interpreted code cannot be compared with native torch: the fallback is the baseline kernel.
    source = render(op.TEMPLATE, op.DEFAULT)
    return load(source, op.DEFAULT, variant_id(source, op.DEFAULT), cache_dir)


def _compile_failure(error: BaseException | None) -> bool:
    # The interpreter raises InterpreterError where a GPU build fails to compile (a block that is
    # not a power of 2, a bad constexpr): both mean the source cannot run on that shape.
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors as runtime_errors

    interpreter_error = getattr(runtime_errors, "InterpreterError", CompilationError)
    return isinstance(error, (CompilationError, interpreter_error))
