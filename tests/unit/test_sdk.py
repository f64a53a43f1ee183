"""The SDK's dispatch: the fallback where nothing is deployed, the deployed variant for its bucket
only, refusal of tampered sources, sampled timing, torch.compile, and patching RMSNorm modules."""
import pytest
import torch

from observer.sdk import customops, ops, patch
from observer.sdk.dispatch import SAMPLE_EVERY, Served, verify_and_load
from shared import hardware
from shared.ops import rmsnorm
from shared.schemas import RegistryEntry
from shared.variants import render, variant_id
from shared.windows import WindowAggregator

DEVICE = hardware.device()
PARAMS = {"BLOCK": 256, "ROWS": 2, "num_warps": 2}


def _entry(params=PARAMS, **changes) -> RegistryEntry:
    source = render(rmsnorm.TEMPLATE, params)
    fields = dict(variant_id=variant_id(source, params), source=source, params=params, speedup=1.3,
                  campaign_id="c1", approved_by="gate")
    return RegistryEntry(**(fields | changes))


def _close_to_reference(y, x, w):
    ref = rmsnorm.reference(x, w)
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    return y.dtype == x.dtype and y.shape == x.shape and err <= rmsnorm.TOLERANCE[str(x.dtype).removeprefix("torch.")]


@pytest.fixture
def dispatcher():
    d = customops.dispatcher
    d.hardware = "cpu-interpreter"
    yield d
    d.table.clear()
    d.windows = None
    d.sample_every = SAMPLE_EVERY


class Counting:
    def __init__(self, launch):
        self.launch, self.calls = launch, 0

    def __call__(self, *args):
        self.calls += 1
        return self.launch(*args)


def test_fallback_is_the_baseline_triton_kernel_in_the_interpreter_else_the_reference(dispatcher):
    x, w = rmsnorm.make_inputs([3, 1000], torch.float16, DEVICE, seed=1)
    assert (dispatcher.fallback("rmsnorm", DEVICE) is rmsnorm.reference) == (not hardware.interpreted())
    assert _close_to_reference(ops.rmsnorm(x, w), x, w)
    assert dispatcher.serving(dispatcher.key("rmsnorm", "float16", "h1000-r16")) is None


def test_deployed_variant_serves_its_bucket_only(dispatcher, tmp_path):
    entry = _entry()
    launch = Counting(verify_and_load(entry, tmp_path))
    dispatcher.install(dispatcher.key("rmsnorm", "float16", "h256-r16"), Served(entry.variant_id, launch, entry))
    x, w = rmsnorm.make_inputs([5, 256], torch.float16, DEVICE, seed=2)
    assert _close_to_reference(ops.rmsnorm(x, w), x, w)
    assert launch.calls == 1
    other_x, other_w = rmsnorm.make_inputs([5, 512], torch.float16, DEVICE, seed=3)
    ops.rmsnorm(other_x, other_w)  # another hidden size: another bucket, still the fallback
    ops.rmsnorm(x.float(), w.float())  # another dtype: another key
    assert launch.calls == 1


def test_removed_deploy_goes_back_to_the_fallback(dispatcher, tmp_path):
    entry = _entry()
    launch = Counting(verify_and_load(entry, tmp_path))
    key = dispatcher.key("rmsnorm", "float16", "h256-r16")
    dispatcher.install(key, Served(entry.variant_id, launch, entry))
    dispatcher.remove(key)
    x, w = rmsnorm.make_inputs([2, 256], torch.float16, DEVICE, seed=4)
    ops.rmsnorm(x, w)
    assert launch.calls == 0 and dispatcher.serving(key) is None


def test_source_that_does_not_hash_to_its_id_is_refused(tmp_path):
    good = _entry()
    tampered = good.model_copy(update={"source": good.source.replace("rstd * w", "rstd * w * 1.01")})
    with pytest.raises(ValueError, match="hashes to"):
        verify_and_load(tampered, tmp_path)
    assert not list(tmp_path.glob("*.py")), "nothing of a refused source may be written or run"


def test_source_failing_static_checks_is_refused_even_with_a_matching_id(tmp_path):
    source = "import os\n" + render(rmsnorm.TEMPLATE, PARAMS)
    entry = _entry().model_copy(update={"source": source, "variant_id": variant_id(source, PARAMS)})
    with pytest.raises(ValueError, match="import of os"):
        verify_and_load(entry, tmp_path)


def test_failing_variant_falls_back_and_is_dropped(dispatcher, caplog):
    def broken(x, weight, eps=1e-6):
        raise RuntimeError("boom")

    key = dispatcher.key("rmsnorm", "float32", "h64-r16")
    dispatcher.install(key, Served("broken", broken, _entry()))
    x, w = rmsnorm.make_inputs([2, 64], torch.float32, DEVICE, seed=5)
    assert _close_to_reference(ops.rmsnorm(x, w), x, w)
    assert dispatcher.serving(key) is None
    assert "broken failed" in caplog.text


def test_a_keys_first_calls_then_one_in_sample_every_are_timed_and_the_serving_variant_recorded(dispatcher,
                                                                                              tmp_path):
    entry = _entry()
    dispatcher.install(dispatcher.key("rmsnorm", "float16", "h256-r16"),
                       Served(entry.variant_id, verify_and_load(entry, tmp_path), entry))
    dispatcher.windows = WindowAggregator("cpu-interpreter", "h:1", start=0.0)
    dispatcher.sample_every = 4
    x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=6)
    for _ in range(17):
        ops.rmsnorm(x, w)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dispatcher.resolve_timings()  # device events are read when the window flushes
    (s,) = dispatcher.windows.flush(1.0)
    # calls 2 and 4 (a new key's first ones), then 8, 12, 16: one in four
    assert s.calls == 17 and s.sampled_calls == 5 and s.sampled_time_us > 0
    assert s.variant_id == entry.variant_id and s.shapes[0].shape == [4, 256]


def test_a_new_variant_has_its_first_calls_timed_again_and_the_window_names_it(dispatcher, tmp_path):
    dispatcher.windows = WindowAggregator("cpu-interpreter", "h:1", start=0.0)
    dispatcher.sample_every = 1000
    x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=6)
    for _ in range(20):  # the fallback's calls 2, 4, 8 and 16 are timed
        ops.rmsnorm(x, w)
    (before,) = dispatcher.windows.flush(1.0)
    assert before.calls == 20 and before.sampled_calls == 4 and before.variant_id is None
    entry = _entry()
    dispatcher.install(dispatcher.key("rmsnorm", "float16", "h256-r16"),
                       Served(entry.variant_id, verify_and_load(entry, tmp_path), entry))
    for _ in range(4):
        ops.rmsnorm(x, w)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dispatcher.resolve_timings()
    (after,) = dispatcher.windows.flush(2.0)
    assert after.calls == 4 and after.sampled_calls == 2 and after.variant_id == entry.variant_id


def test_compiled_model_picks_up_a_hot_swap_without_recompiling(dispatcher, tmp_path):
    compiled = torch.compile(lambda x, w: ops.rmsnorm(x, w) * 2, backend="aot_eager", fullgraph=True)
    x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=7)
    before = compiled(x, w)
    entry = _entry()
    launch = Counting(verify_and_load(entry, tmp_path))
    dispatcher.install(dispatcher.key("rmsnorm", "float16", "h256-r16"), Served(entry.variant_id, launch, entry))
    after = compiled(x, w)
    assert launch.calls == 1
    assert torch.allclose(before.float(), after.float(), atol=1e-2)


def test_custom_op_registration_passes_opcheck():
    x, w = rmsnorm.make_inputs([3, 128], torch.float32, DEVICE, seed=8)
    torch.library.opcheck(torch.ops.kernelloop.rmsnorm.default, (x, w, 1e-6))


class LlamaRMSNorm(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class GemmaRMSNorm(LlamaRMSNorm):
    def forward(self, x):  # scales by (1 + weight): the op with 1 + weight for its weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


class MeanCenteredRMSNorm(LlamaRMSNorm):
    def forward(self, x):  # subtracts the mean first: the same attributes, another function
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


def test_patch_swaps_rmsnorm_modules_counts_their_calls_and_keeps_outputs(dispatcher):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.RMSNorm(64, eps=1e-5),
                                torch.nn.Sequential(LlamaRMSNorm(64)), GemmaRMSNorm(64), MeanCenteredRMSNorm(64))
    model.to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
        patch(model)
        dispatcher.windows = WindowAggregator("cpu-interpreter", "h:1", start=0.0)
        got = model(x)
    (stats,) = dispatcher.windows.flush(1.0)
    assert stats.calls == 3 and str(stats.key) == "cpu-interpreter.rmsnorm.float32.h64-r16"
    assert type(model[1]).__name__ == "PatchedRMSNorm" and type(model[2][0]).__name__ == "PatchedRMSNorm"
    assert type(model[3]).__name__ == "PatchedRMSNorm" and model[3].offset == 1.0
    assert isinstance(model[4], MeanCenteredRMSNorm), "a look-alike that computes something else must stay"
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "2.0.weight", "3.weight", "4.weight"}
    assert torch.allclose(expected, got, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_deployed_variant_is_captured_in_a_cuda_graph_while_observed(dispatcher, tmp_path):
    entry = _entry({"BLOCK": 4096, "ROWS": 1, "num_warps": 8})
    dispatcher.install(dispatcher.key("rmsnorm", "float16", "h4096-r16"),
                       Served(entry.variant_id, verify_and_load(entry, tmp_path), entry))
    dispatcher.windows = WindowAggregator("cpu-interpreter", "h:1", start=0.0)
    dispatcher.sample_every = 1  # every call would be timed, but not inside a capture
    x, w = rmsnorm.make_inputs([16, 4096], torch.float16, "cuda", seed=9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.rmsnorm(x, w)  # compiles before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.rmsnorm(x, w)
    x.copy_(rmsnorm.make_inputs([16, 4096], torch.float16, "cuda", seed=10)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert _close_to_reference(y, x, w)
