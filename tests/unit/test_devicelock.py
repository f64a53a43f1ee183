"""The device lock across processes: checks overlap each other, a timing overlaps nothing, a waiting
timing is not starved by checks that arrive after it, and a killed holder frees the device."""
import multiprocessing
import os
import signal
import time

from benchmarker.devicelock import DeviceLock, device_id


def _hold(folder, mode, start_at, hold_s, out):
    time.sleep(max(0.0, start_at - time.time()))
    lock = DeviceLock(folder, "dev")
    with getattr(lock, mode)():
        got = time.time()
        time.sleep(hold_s)
        out.put((mode, start_at, got, time.time()))


def _run(tmp_path, plan):
    """plan: (mode, start offset s, hold s) per process -> {start offset: (got, released)}"""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    t0 = time.time() + 1.5  # after every spawned process has started
    procs = [ctx.Process(target=_hold, args=(tmp_path, mode, t0 + at, hold, out)) for mode, at, hold in plan]
    for p in procs:
        p.start()
    rows = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    return {round(start - t0, 2): (got - t0, end - t0) for _, start, got, end in rows}


def test_checks_overlap_and_a_timing_waits_for_them_then_runs_alone(tmp_path):
    got = _run(tmp_path, [("shared", 0.0, 1.0), ("shared", 0.1, 1.0), ("exclusive", 0.3, 0.5), ("shared", 0.6, 0.2)])
    (a_got, a_end), (b_got, b_end) = got[0.0], got[0.1]
    (w_got, w_end), (late_got, _) = got[0.3], got[0.6]
    assert b_got < a_end  # two checks at once
    assert w_got >= max(a_end, b_end) - 0.02  # the timing waited for both
    # the check that came after the timing asked waited for it: no starvation
    assert late_got >= w_end - 0.02


def test_a_killed_holder_frees_the_device(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    holder = ctx.Process(target=_hold, args=(tmp_path, "exclusive", time.time(), 60.0, out))
    holder.start()
    lock = DeviceLock(tmp_path, "dev")
    deadline = time.time() + 20
    while not any(p.name.endswith(".lock") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the holder has the lock by now
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    started = time.monotonic()
    with lock.exclusive() as waited:
        assert waited < 5 and time.monotonic() - started < 5


def test_the_cpu_is_one_device():
    assert device_id("cpu") == "cpu"
