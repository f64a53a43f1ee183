"""The sampling observer without a broker: its schedule records `active` steps in every `every`,
profiled steps of a plain model become KernelStats with their shapes, calls kernelloop's dispatch
already counts are not counted twice, and close() hands over the range being recorded."""
import pytest
import torch
from torch.profiler import ProfilerAction

from observer.sdk import ops
from observer.sdk.sampling import Sampler, profiler_schedule, without_dispatched


def test_schedule_records_active_steps_in_every_and_waits_through_the_first_cycle():
    s = profiler_schedule(every=5, active=2)
    actions = [s(step) for step in range(10)]
    assert actions[:5] == [ProfilerAction.NONE, ProfilerAction.NONE, ProfilerAction.WARMUP,
                           ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE]
    assert actions[5:] == actions[:5]


@pytest.mark.parametrize("every, active", [(1, 1), (3, 3), (4, 0)])
def test_a_rate_that_leaves_no_step_unprofiled_is_refused(every, active):
    with pytest.raises(ValueError, match="active < every"):
        profiler_schedule(every, active)


def _cpu_op(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid,
            "args": {"Input Dims": [[4, 64], [64]], "Input type": ["float", "float"]}}


def test_calls_inside_kernelloop_ops_are_dropped_and_the_rest_kept():
    trace = {"traceEvents": [_cpu_op("kernelloop::softmax", 10, 10), _cpu_op("aten::softmax", 12, 5),
                             _cpu_op("aten::softmax", 12, 5, tid=2), _cpu_op("aten::rms_norm", 30, 5)]}
    kept = without_dispatched(trace)["traceEvents"]
    assert [(e["name"], e["tid"]) for e in kept] == [("aten::softmax", 2), ("aten::rms_norm", 1)]
    assert without_dispatched({"traceEvents": kept})["traceEvents"] == kept


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(64)
        self.probs = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        return self.probs(self.norm(x))


@torch.no_grad()
def test_profiled_steps_of_a_model_become_stats_and_close_hands_over_the_open_range():
    got = []
    model, x = Net(), torch.randn(4, 64)
    sampler = Sampler(model, got.extend, "cpu-test", "h:1", every=4, active=2)
    for _ in range(10):  # ranges at steps 3-4 and 7-8; step 9 waits
        model(x)
    assert sampler.steps == 10
    sampler.close()
    keys = sorted(str(s.key) for s in got)
    assert keys == ["cpu-test.rmsnorm.float32.h64-r16"] * 2 + ["cpu-test.softmax.float32.n64-r16"] * 2
    assert all(s.calls == 2 and s.shapes[0].shape == [4, 64] and s.source == "h:1" for s in got)
    model(x)
    assert sampler.steps == 10 and not model._forward_hooks, "closed: the model is as it was"


@torch.no_grad()
def test_a_range_open_at_close_is_converted_too():
    got = []
    sampler = Sampler(Net(), got.extend, "cpu-test", "h:1", every=3, active=2)
    for _ in range(2):  # the second step is the first recorded one
        sampler(torch.randn(2, 64))
    sampler.close()
    assert {s.key.op for s in got} == {"rmsnorm", "softmax"} and all(s.calls == 1 for s in got)


@torch.no_grad()
def test_kernelloop_ops_in_a_profiled_step_are_left_to_the_dispatch():
    got = []

    def step(x):
        return ops.softmax(torch.nn.functional.rms_norm(x, (64,)))

    sampled = Sampler(step, got.extend, "cpu-test", "h:1", every=2, active=1)
    for _ in range(4):
        sampled(torch.randn(3, 64))
    sampled.close()
    assert {s.key.op for s in got} == {"rmsnorm"} and sum(s.calls for s in got) == 2
