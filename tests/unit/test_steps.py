"""The step clock of observe(model) (observer/sdk/steps.py): the kind of a step from its inputs, and
the start of each top-level forward (or step-function call) handed to the canaries."""
import pytest
import torch

from observer.sdk.canary import CanaryController
from observer.sdk.dispatch import Dispatcher
from observer.sdk.steps import StepClock, step_kind


def ids(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long)


@pytest.mark.parametrize("args, kwargs, kind", [
    ((ids(16, 1),), {}, "decode:b16"),
    ((ids(13, 1),), {}, "decode:b16"),  # batches bucket to powers of two
    ((ids(1, 1),), {}, "decode:b1"),
    ((ids(2, 300),), {}, "prefill:n1024"),
    ((), {"input_ids": ids(4, 1)}, "decode:b4"),
    ((torch.zeros(4, 1, 64),), {}, "decode:b4"),  # embeddings [batch, seq, hidden]
    ((torch.zeros(1, 2048, 64),), {}, "prefill:n2048"),
    ((torch.zeros(8, 3, 32, 32),), {}, "input:8x3x32x32"),
    ((3, "x"), {}, "step"),
])
def test_step_kind_from_the_first_tensor_input(args, kwargs, kind):
    assert step_kind(args, kwargs) == kind


class Recorder(CanaryController):
    def __init__(self, tmp_path):
        super().__init__(Dispatcher(tmp_path), "host:1", slot_s=1.0)
        self.steps = []

    def step(self, kind, now=None):
        self.steps.append((kind, now))


def test_step_clock_hooks_a_module_forward_and_close_detaches_it(tmp_path):
    canary = Recorder(tmp_path)
    times = iter([1.0, 2.0, 3.0])
    model = torch.nn.Embedding(10, 4)
    clock = StepClock(canary, clock=lambda: next(times))
    assert clock.attach(model) is model and canary.measure == "step"
    model(ids(2, 1))
    model(ids(2, 5))
    assert canary.steps == [("decode:b2", 1.0), ("prefill:n16", 2.0)]
    clock.close()
    model(ids(2, 1))
    assert len(canary.steps) == 2 and canary.measure == "key"


def test_step_clock_counts_a_step_function_that_calls_itself_once(tmp_path):
    canary = Recorder(tmp_path)
    clock = StepClock(canary, clock=lambda: 5.0)

    def step(x, depth=1):
        return stepped(x, depth - 1) if depth else x

    stepped = clock.attach(step)
    assert stepped.__name__ == "step"
    stepped(ids(4, 1), depth=2)
    assert canary.steps == [("decode:b4", 5.0)]
