"""Profiler traces -> KernelStats: a real torch.profiler trace of the ops, of a small LLaMA-style
block that calls none of them and of tiny transformers Llama, Gemma and Phi-3 models, aten ops and
unfused patterns (norms, SwiGLU, fused gate-up, rotary) mapped to catalog ops with the shapes,
dtypes and counts the model ran, nested calls counted once, device time preferred where the trace
has it, hot unmapped ops reported with their time, and junk skipped with a reason, never raised."""
import copy
import json
import random
import time

import pytest
import torch

from observer.ingest.opmap import catalog_op
from observer.ingest.stats import HOT_SHARE, ingest_profiler_trace, stats_from_profiler_trace, summarise
from observer.sdk import ops
from support.profiled_model import FFN, HIDDEN, ROWS, profile_block
from support.profiled_model import TOKENS as TOKENS_HF


def _profile(tmp_path, work) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> dict:
    x = torch.randn(4, 256, dtype=torch.float16)
    w = torch.ones(256, dtype=torch.float16)
    xb = torch.randn(3, 64, 128, dtype=torch.bfloat16)
    ops.rmsnorm(x, w)  # load the fallback before profiling, as a warm process would have

    def work():
        for _ in range(3):
            ops.rmsnorm(x, w)
        torch.nn.functional.rms_norm(xb, (128,), torch.ones(128, dtype=torch.bfloat16))
        torch.cumsum(x, -1)  # not a catalog op

    return _profile(tmp_path_factory.mktemp("prof"), work)


def test_catalog_op_maps_profiler_names():
    assert catalog_op("kernelloop::rmsnorm") == "rmsnorm"
    assert catalog_op("aten::rms_norm") == "rmsnorm"
    assert catalog_op("LlamaRMSNorm") == "rmsnorm"
    assert catalog_op("kernelloop::nope") is None
    assert catalog_op("aten::layer_norm") == "layernorm"
    assert catalog_op("aten::matmul") == "matmul"  # [M, N, K] from both inputs
    assert catalog_op("aten::linear") == "matmul" and catalog_op("aten::addmm") == "matmul"
    assert catalog_op("aten::_softmax") == "softmax"
    assert catalog_op("aten::log_softmax") is None and catalog_op("aten::_softmax_backward_data") is None
    assert catalog_op("_C::fused_add_rms_norm") == "rmsnorm_residual"
    assert catalog_op("_C::silu_and_mul") == "silu_and_mul"
    assert catalog_op("aten::gelu") is None and catalog_op("aten::bmm") is None


def test_real_trace_gives_stats_per_key_with_shapes_and_times(trace):
    stats = {str(s.key): s for s in stats_from_profiler_trace(trace, "cpu-interpreter", "host:7")}
    assert set(stats) == {"cpu-interpreter.rmsnorm.float16.h256-r16", "cpu-interpreter.rmsnorm.bfloat16.h128-r256"}
    ours = stats["cpu-interpreter.rmsnorm.float16.h256-r16"]
    assert ours.calls == 3 and [(c.shape, c.calls) for c in ours.shapes] == [([4, 256], 3)]
    # every call in a trace is timed
    assert ours.sampled_calls == 3 and ours.sampled_time_us > 0 and ours.time_us_p50 > 0
    assert ours.source == "host:7" and ours.variant_id is None
    # aten::rms_norm runs aten::_fused_rms_norm inside: one call, not two
    aten = stats["cpu-interpreter.rmsnorm.bfloat16.h128-r256"]
    assert aten.calls == 1 and aten.shapes[0].shape == [3, 64, 128]


def test_window_is_the_traces_span_in_wall_clock(trace):
    (s, *_) = stats_from_profiler_trace(trace, "cpu-interpreter", "host:7")
    assert 0 < s.window_s < 60
    # recorded moments ago: the trace's base time plus its relative timestamps is now
    assert abs(s.window_start.timestamp() - time.time()) < 600


def test_trace_without_catalog_ops_gives_nothing(tmp_path):
    x = torch.randn(8, 8)
    assert stats_from_profiler_trace(_profile(tmp_path, lambda: x.cumsum(-1)), "cpu-interpreter", "h:1") == []


def test_trace_without_events_is_refused():
    with pytest.raises(ValueError, match="traceEvents"):
        stats_from_profiler_trace({"schemaVersion": 1}, "cpu-interpreter", "h:1")


def test_device_kernels_launched_inside_a_call_give_its_time():
    # The fields Kineto writes on a CUDA trace: the kernel carries the External id of the op
    # that launched it; the op's own duration is only the host's launch time.
    op = {"ph": "X", "cat": "cpu_op", "name": "kernelloop::rmsnorm", "pid": 1, "tid": 1, "ts": 100.0, "dur": 30.0,
          "args": {"External id": 5, "Input Dims": [[16, 4096], [4096], []],
                   "Input type": ["c10::Half", "c10::Half", "Scalar"]}}
    inner = {"ph": "X", "cat": "cpu_op", "name": "aten::empty_like", "pid": 1, "tid": 1, "ts": 101.0, "dur": 2.0,
             "args": {"External id": 6, "Input Dims": [[16, 4096]], "Input type": ["c10::Half"]}}
    kernel = {"ph": "X", "cat": "kernel", "name": "_rmsnorm_fwd", "pid": 0, "tid": 7, "ts": 140.0, "dur": 7.5,
              "args": {"External id": 5, "correlation": 9}}
    (s,) = stats_from_profiler_trace({"traceEvents": [op, inner, kernel]}, "nvidia-h100", "h:1")
    assert str(s.key) == "nvidia-h100.rmsnorm.float16.h4096-r16"
    assert s.calls == 1 and s.sampled_time_us == pytest.approx(7.5)


# ---- a small LLaMA-style block that calls no kernelloop op ----------------------------------------

STEPS = 3


def _model_trace(tmp_path, dtype, steps=STEPS, record_shapes=True) -> dict:
    return profile_block(tmp_path / "model.json", dtype, steps, record_shapes)


@pytest.fixture(scope="module")
def model_trace(tmp_path_factory) -> dict:
    return _model_trace(tmp_path_factory.mktemp("model"), torch.bfloat16)


def test_model_trace_maps_linears_norms_swiglu_and_softmax_with_the_models_shapes_and_counts(model_trace):
    result = ingest_profiler_trace(model_trace, "cpu-interpreter", "host:1")
    got = {str(s.key): (s.calls, [(c.shape, c.calls) for c in s.shapes]) for s in result.stats}
    rows = ROWS[0] * ROWS[1]
    assert got == {
        # gate and up share a weight shape; aten::linear's inner matmul and mm count once
        f"cpu-interpreter.matmul.bfloat16.n{FFN}-k{HIDDEN}-m16": (2 * STEPS, [([rows, FFN, HIDDEN], 2 * STEPS)]),
        f"cpu-interpreter.matmul.bfloat16.n{HIDDEN}-k{FFN}-m16": (STEPS, [([rows, HIDDEN, FFN], STEPS)]),
        f"cpu-interpreter.rmsnorm.bfloat16.h{HIDDEN}-r16": (STEPS, [([*ROWS, HIDDEN], STEPS)]),
        f"cpu-interpreter.silu_and_mul.bfloat16.h{2 * FFN}-r16": (STEPS, [([rows, 2 * FFN], STEPS)]),
        "cpu-interpreter.softmax.bfloat16.n5-r16": (STEPS, [([*ROWS, 5], STEPS)]),
        f"cpu-interpreter.layernorm.bfloat16.h{HIDDEN}-r16": (STEPS, [([*ROWS, HIDDEN], STEPS)]),
    }
    assert all(s.sampled_calls == s.calls and s.sampled_time_us > 0 for s in result.stats)
    how = {(m.key.op): m.from_ops for m in result.mapped}
    assert how["rmsnorm"] == ["HF RMSNorm pattern (pow, mean, rsqrt, mul)"]
    assert how["silu_and_mul"] == ["SwiGLU pattern (silu, mul)"] and how["matmul"] == ["aten::linear"]
    assert how["softmax"] == ["aten::softmax"] and how["layernorm"] == ["aten::layer_norm"]
    assert result.skipped == []
    assert summarise(result, "t1", "cpu-interpreter", "host:1").status == "ok"


def test_model_trace_reports_hot_unmapped_ops_with_their_time(model_trace):
    result = ingest_profiler_trace(model_trace, "cpu-interpreter", "host:1")
    unmapped = {u.name: u for u in result.unmapped}
    assert "aten::sort" in unmapped and "aten::matmul" in unmapped  # the batched h @ h.T
    sort = unmapped["aten::sort"]
    assert sort.calls == STEPS and sort.time_us > 0 and sort.shape == [*ROWS, HIDDEN * 64]
    assert sort.dtype == "float32" and sort.share == pytest.approx(sort.time_us / result.total_time_us)
    assert all(u.share >= HOT_SHARE for u in result.unmapped)
    assert [u.time_us for u in result.unmapped] == sorted((u.time_us for u in result.unmapped), reverse=True)
    # mapped and unmapped time never add up to more than the trace's
    assert sum(m.share for m in result.mapped) + sum(u.share for u in result.unmapped) <= 1 + 1e-9


def test_float32_model_maps_norms_and_reports_matmuls_the_catalog_has_no_kernels_for(tmp_path):
    result = ingest_profiler_trace(_model_trace(tmp_path, torch.float32, steps=1), "cpu-interpreter", "h:1")
    assert {s.key.op for s in result.stats} == {"rmsnorm", "silu_and_mul", "softmax", "layernorm"}
    assert all(s.key.dtype == "float32" for s in result.stats)
    linear = next(u for u in result.unmapped if u.name == "aten::linear")
    assert linear.calls == 3 and "no float32 kernels" in linear.note
    assert any("aten::linear: matmul has no float32 kernels" in line for line in result.skipped)


def test_trace_without_shapes_gives_no_stats_and_says_why(tmp_path):
    result = ingest_profiler_trace(_model_trace(tmp_path, torch.bfloat16, steps=1, record_shapes=False),
                                   "cpu-interpreter", "h:1")
    assert result.stats == []
    assert any("record_shapes=True" in line for line in result.skipped)
    assert summarise(result, "t2", "cpu-interpreter", "h:1").status == "partial"


def test_hand_written_batched_and_misshapen_calls_are_not_taken_for_catalog_ops():
    def op(name, ts, dims, types, concrete=None, dur=10.0):
        args = {"Input Dims": dims, "Input type": types}
        if concrete:
            args["Concrete Inputs"] = concrete
        return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur, "args": args}

    half = "c10::Half"
    events = [op("aten::bmm", 0, [[4, 16, 64], [4, 64, 16]], [half, half]),
              op("aten::matmul", 20, [[4, 16, 64], [4, 64, 16]], [half, half]),
              op("aten::mm", 40, [[16, 64], [32, 16]], [half, half]),  # K disagrees
              op("aten::softmax", 60, [[16, 128], [], []], [half, "Scalar", ""], ["", "0", ""]),  # not the last dim
              op("aten::linear", 80, [[3, 7, 64], [128, 64], []], [half, half, ""]),
              "junk", {"ph": "X", "name": "no times"}]
    result = ingest_profiler_trace({"traceEvents": events}, "nvidia-h100", "h:1")
    assert [(str(s.key), s.shapes[0].shape) for s in result.stats] == [
        ("nvidia-h100.matmul.float16.n128-k64-m64", [21, 128, 64])]
    assert {u.name for u in result.unmapped} == {"aten::bmm", "aten::matmul", "aten::mm", "aten::softmax"}
    assert any("2 trace events" in line for line in result.skipped)
    assert any("aten::mm: inputs [16, 64] and [32, 16]" in line for line in result.skipped)


def test_mangled_traces_never_raise(model_trace):
    """Any event may lose a field or carry a value of the wrong type: skipped, never a crash."""
    rng = random.Random(0)
    junk = [None, "x", -1, 1e300, [], {}, [[-3, "a"]], [None], True]
    events = [e for e in model_trace["traceEvents"] if e.get("cat") == "cpu_op"]
    for _ in range(40):
        mangled = copy.deepcopy(events)
        for e in rng.sample(mangled, k=len(mangled) // 4):
            field = rng.choice(["name", "ts", "dur", "args", "pid", "tid", "ph"])
            e[field] = rng.choice(junk)
            if isinstance(e.get("args"), dict):
                key = rng.choice(["Input Dims", "Input type", "Concrete Inputs", "External id"])
                e["args"][key] = rng.choice(junk)
        trace = {"traceEvents": mangled, "baseTimeNanoseconds": "soon"}
        result = ingest_profiler_trace(trace, "cpu-interpreter", "h:1")
        assert all(s.calls > 0 for s in result.stats)


def test_device_trace_shares_count_kernel_time_and_leave_host_only_ops_out():
    def op(name, ts, dur, ext, dims):
        return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur,
                "args": {"External id": ext, "Input Dims": dims, "Input type": ["c10::BFloat16"] * len(dims)}}

    def kernel(ts, dur, ext):
        return {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": ts, "dur": dur,
                "args": {"External id": ext}}

    events = [op("aten::linear", 0, 20, 1, [[16, 4096], [1024, 4096]]), kernel(100, 60, 1),
              op("aten::view", 30, 5, 2, [[16, 1024]]),  # host work only: no device time
              op("aten::gelu", 40, 10, 3, [[16, 1024]]), kernel(200, 20, 3),
              op("aten::_softmax", 60, 10, 4, [[16, 1024]]), kernel(250, 20, 4)]
    result = ingest_profiler_trace({"traceEvents": events}, "nvidia-h100", "h:1")
    assert result.total_time_us == pytest.approx(100)
    assert [(str(m.key), m.time_us, m.share) for m in result.mapped] == [
        ("nvidia-h100.matmul.bfloat16.n1024-k4096-m16", 60, 0.6), ("nvidia-h100.softmax.bfloat16.n1024-r16", 20, 0.2)]
    assert [(u.name, u.time_us, u.share, u.shape) for u in result.unmapped] == [("aten::gelu", 20, 0.2, [16, 1024])]


# ---- tiny transformers models: rotary, Gemma's norm, Phi-3's fused gate-up --------------------------

HF_STEPS = 2


@pytest.fixture(scope="module")
def hf_traces(tmp_path_factory) -> dict:
    """name -> (config, trace, what ingest made of it) for a tiny Llama, Gemma and Phi-3."""
    pytest.importorskip("transformers", reason="transformers is a dev dependency")
    from support.profiled_model import profile_transformers, tiny_transformers

    folder = tmp_path_factory.mktemp("hf")
    found = {}
    for name in ("Llama", "Gemma", "Phi3"):
        model = tiny_transformers(name)
        trace = profile_transformers(folder / f"{name}.json", model, HF_STEPS)
        found[name] = model.config, trace, ingest_profiler_trace(trace, "cpu-interpreter", "h:1")
    return found


def _by_op(result, op: str) -> tuple[dict, list]:
    """shape -> calls of the op, over every key, and the patterns it was read from."""
    shapes = {}
    for s in result.stats:
        if s.key.op == op:
            shapes.update({tuple(c.shape): c.calls for c in s.shapes})
    return shapes, sorted({how for m in result.mapped if m.key.op == op for how in m.from_ops})


@pytest.mark.parametrize("name", ["Llama", "Gemma", "Phi3"])
def test_hf_attention_rotary_maps_to_rotary_for_q_and_k_per_layer(hf_traces, name):
    """apply_rotary_pos_emb (q * cos + rotate_half(q) * sin) runs once on q, once on k a layer."""
    config, trace, result = hf_traces[name]
    tokens = TOKENS_HF[0] * TOKENS_HF[1]
    calls = config.num_hidden_layers * HF_STEPS
    shapes, how = _by_op(result, "rotary")
    assert shapes == {(tokens, config.num_attention_heads, config.head_dim): calls,
                      (tokens, config.num_key_value_heads, config.head_dim): calls}
    assert how == ["rotary pattern (mul, neg, cat, mul, add)"]
    # every rotate_half of the trace is inside one of them
    negs = sum(1 for e in trace["traceEvents"] if e.get("name") == "aten::neg")
    assert negs == sum(shapes.values())


def test_gemma_norm_with_one_plus_weight_maps_to_rmsnorm(hf_traces):
    config, _, result = hf_traces["Gemma"]
    shapes, how = _by_op(result, "rmsnorm")
    # two norms a layer and the final one, each on the [batch, seq, hidden] activations
    assert shapes == {(*TOKENS_HF, config.hidden_size): (2 * config.num_hidden_layers + 1) * HF_STEPS}
    assert how == ["Gemma RMSNorm pattern (pow, mean, rsqrt, mul, 1 + weight)"]
    assert result.skipped == []


def test_phi3_fused_gate_up_maps_to_silu_and_mul(hf_traces):
    config, _, result = hf_traces["Phi3"]
    shapes, how = _by_op(result, "silu_and_mul")
    assert shapes == {(TOKENS_HF[0] * TOKENS_HF[1], 2 * config.intermediate_size): config.num_hidden_layers * HF_STEPS}
    assert how == ["fused gate-up pattern (chunk, silu, mul)"]
    assert "aten::chunk" not in {u.name for u in result.unmapped}


@pytest.mark.parametrize("x, c, bucket", [
    ([1, 8, 4, 128], [1, 1, 4, 128], "d128-h8-t16"),  # q: [batch, heads, seq, head_dim], unsqueeze_dim=1
    ([2, 4, 8, 128], [2, 4, 1, 128], "d128-h8-t16"),  # [batch, seq, heads, head_dim], unsqueeze_dim=2
    ([32, 8, 1, 64], [32, 1, 1, 64], "d64-h8-t256"),  # decode: one position per sequence
])
def test_rotary_pattern_time_is_the_device_time_of_all_its_ops(x, c, bucket):
    bf16 = "c10::BFloat16"
    h = x[:-1] + [x[-1] // 2]
    events, ts = [], 0

    def op(name, dims, kernel_us=None):
        nonlocal ts
        ext = len(events) + 1
        args = {"External id": ext, "Input Dims": dims, "Input type": [bf16] * len(dims)}
        events.append({"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": 5, "args": args})
        if kernel_us:
            events.append({"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 1000 + ts,
                           "dur": kernel_us, "args": {"External id": ext}})
        ts += 10

    op("aten::mul", [x, c], 3.0)
    op("aten::slice", [x, [], [], [], []])  # views: no kernel
    op("aten::slice", [x, [], [], [], []])
    op("aten::neg", [h], 2.0)
    op("aten::cat", [[h, h], []], 4.0)
    op("aten::mul", [x, c], 3.0)
    op("aten::add", [x, x, []], 5.0)
    op("aten::mul", [x, c], 1.0)  # a lone mul by cos, no rotate_half after: not rotary
    result = ingest_profiler_trace({"traceEvents": events}, "nvidia-h100", "h:1")
    # mul 3 + neg 2 + cat 4 + mul 3 + add 5; the slices launch nothing and add nothing
    assert [(str(m.key), m.calls, m.time_us) for m in result.mapped] == [
        (f"nvidia-h100.rotary.bfloat16.{bucket}", 1, 17.0)]
    assert [(u.name, u.calls, u.time_us) for u in result.unmapped] == [("aten::mul", 1, 1.0)]
