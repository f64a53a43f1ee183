"""The correctness check: the baseline passes; variants with the usual kernel bugs fail, and the
message says on which shape and trial."""
import pytest
import torch

from benchmarker.check import check, output_problem, relative_error
from shared.hardware import device
from shared.ops import rmsnorm, torch_dtype
from shared.variants import load, render, variant_id
from support.rmsnorm_answers import (BLOCK_MULTIPLES_ONLY, ONE_BLOCK_SOURCE, SQUARES_IN_FP16, WRITES_INPUT,
                                     edit)

PROFILE = [[4, 256]]

# ---- small variants, written out so each bug is visible -----------------------------------------

GOOD = ONE_BLOCK_SOURCE
FORGETS_WEIGHT = edit(GOOD, "(x * rstd * w)", "(x * rstd)")
NAN_OUTPUT = edit(GOOD, "tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)", "tl.sqrt(-tl.sum(x * x, axis=0) / n_cols)")
# Two rows per program and a grid that rounds down: the last row of an odd row count is never written.
ROWS_PAIRED = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _rms(X, W, Y, n_cols, eps, BLOCK: tl.constexpr):
    for r in tl.static_range(2):
        row = tl.program_id(0) * 2 + r
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def launch(x, weight, eps=1e-6):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # x2: [rows, hidden]
    y = torch.empty_like(x2)
    _rms[(x2.shape[0] // 2,)](x2, weight, y, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]))
    return y.reshape(x.shape)
'''


def _launcher(source: str, tmp_path, params=None):
    params = params or {}
    return load(source, params, variant_id(source, params), tmp_path)


def _check(source: str, tmp_path, dtype: str = "float16", params=None):
    return check(_launcher(source, tmp_path, params), rmsnorm, torch_dtype(dtype), PROFILE, device(), trials=2, seed=7)


# ---- the check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_baseline_variant_passes_in_every_dtype(dtype, tmp_path):
    ok, message = _check(render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT), tmp_path, dtype, rmsnorm.DEFAULT)
    assert ok, message


def test_small_correct_variant_passes(tmp_path):
    ok, message = _check(GOOD, tmp_path)
    assert ok, message


def test_variant_that_forgets_the_weight_fails_with_shape_trial_and_error(tmp_path):
    ok, message = _check(FORGETS_WEIGHT, tmp_path)
    assert not ok
    assert "shape 3x1000" in message and "trial 0" in message and "error" in message


def test_variant_returning_nan_fails(tmp_path):
    ok, message = _check(NAN_OUTPUT, tmp_path)
    assert not ok
    assert "non-finite" in message


def test_variant_that_skips_the_last_row_of_an_odd_row_count_fails(tmp_path):
    ok, message = _check(ROWS_PAIRED, tmp_path)
    assert not ok
    assert "shape 3x1000" in message


def test_variant_that_drops_the_column_tail_fails(tmp_path):
    ok, message = _check(BLOCK_MULTIPLES_ONLY, tmp_path)
    assert not ok
    assert "shape 3x1000" in message  # 1000 = 15 blocks of 64 + a tail of 40


def test_variant_that_writes_into_its_input_fails(tmp_path):
    ok, message = _check(WRITES_INPUT, tmp_path)
    assert not ok
    assert "inputs" in message


def test_one_wrong_row_is_not_hidden_by_a_large_tensor():
    ref = torch.ones(4096, 64)
    out = ref.clone()
    out[-1, -8:] = 2.0  # 8 wrong elements of 262144: small over the whole tensor, large in their row
    assert relative_error(out, ref) > 0.1


def test_wrong_shape_and_dtype_are_reported_before_values():
    ref = torch.ones(3, 4)
    assert "shape" in output_problem(torch.ones(4, 3), ref)
    assert "dtype" in output_problem(torch.ones(3, 4, dtype=torch.float16), ref)
    assert "not a tensor" in output_problem(None, ref)
    assert output_problem(ref.clone(), ref) is None


# ---- ops with several outputs ------------------------------------------------------------------


def _tuple_launcher(tmp_path, body: str):
    from shared.ops import rmsnorm_residual

    source = render(rmsnorm_residual.TEMPLATE, rmsnorm_residual.DEFAULT).replace(
        "    return y.reshape(shape), h.reshape(shape)\n", body)
    return rmsnorm_residual, _launcher(source, tmp_path, rmsnorm_residual.DEFAULT)


def test_a_two_output_op_passes_when_both_outputs_are_right(tmp_path):
    op, launch = _tuple_launcher(tmp_path, "    return y.reshape(shape), h.reshape(shape)\n")
    ok, message = check(launch, op, torch.float16, [[3, 300]], device(), trials=2, seed=3)
    assert ok, message


def test_a_two_output_op_fails_when_its_second_output_is_wrong(tmp_path):
    op, launch = _tuple_launcher(tmp_path, "    return y.reshape(shape), x\n")
    ok, message = check(launch, op, torch.float16, [[3, 300]], device(), trials=2, seed=3)
    assert not ok and "error" in message


def test_a_two_output_op_fails_when_it_returns_one_tensor(tmp_path):
    op, launch = _tuple_launcher(tmp_path, "    return y.reshape(shape)\n")
    ok, message = check(launch, op, torch.float16, [[3, 300]], device(), trials=1, seed=3)
    assert not ok and "not a tuple of 2 tensors" in message


# ---- launchers that remember, compute on the host, or hold only for small values ---------------

from benchmarker.check import HostCompute, TimedCheck  # noqa: E402
from benchmarker.timing import time_pair  # noqa: E402

CACHES_BY_ADDRESS = edit(edit(GOOD, "def launch(x, weight, eps=1e-6):\n", (
    "_CACHE = {}\n\n\ndef launch(x, weight, eps=1e-6):\n"
    "    if x.data_ptr() in _CACHE:\n"
    "        return _CACHE[x.data_ptr()]\n")), "    return y.reshape(x.shape)\n",
    "    _CACHE[x.data_ptr()] = y.reshape(x.shape)\n    return _CACHE[x.data_ptr()]\n")
TORCH_ON_HOST = edit(GOOD, "    return y.reshape(x.shape)\n",
                      "    xf = x.float()\n    return (xf * ((xf * xf).nanmean(-1, keepdim=True) + eps) ** -0.5 * weight).to(x.dtype)\n")
# Returns its last answer from the third call in a row on the same x.
SKIPS_REPEATS = edit(edit(GOOD, "def launch(x, weight, eps=1e-6):\n", (
    "_LAST = {}\n\n\ndef launch(x, weight, eps=1e-6):\n"
    "    _LAST['n'] = _LAST['n'] + 1 if _LAST.get('x') is x else 0\n"
    "    _LAST['x'] = x\n"
    "    if _LAST['n'] >= 2:\n"
    "        return _LAST['y']\n")), "    return y.reshape(x.shape)\n",
    "    _LAST['y'] = y.reshape(x.shape)\n    return _LAST['y']\n")


def test_a_result_cached_by_input_address_is_stale_when_the_same_buffers_get_new_values(tmp_path):
    ok, message = _check(CACHES_BY_ADDRESS, tmp_path)
    assert not ok
    assert "trial 1" in message  # trial 0 computed it; trial 1 refilled the same tensors


def test_a_kernel_right_only_on_moderate_values_fails_the_large_input_trial(tmp_path):
    ok, message = _check(SQUARES_IN_FP16, tmp_path)
    assert not ok
    assert "large inputs" in message


def test_torch_computing_the_answer_on_the_host_raises_host_compute(tmp_path):
    with pytest.raises(HostCompute, match="aten.mul.*aten.pow"):
        _check(TORCH_ON_HOST, tmp_path, "float32")


def test_timed_calls_get_unseen_inputs_and_a_skipped_call_is_caught(tmp_path):
    args = rmsnorm.make_inputs([4, 256], torch.float16, device(), seed=3)
    baseline = _launcher(render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT), tmp_path, rmsnorm.DEFAULT)
    honest = TimedCheck(rmsnorm, args, rmsnorm.TOLERANCE["float16"], seed=3, checked=1)
    time_pair(baseline, _launcher(GOOD, tmp_path), args, reps=3, warmup=1, device=device(), guard=honest)
    assert honest.verdict() is None and honest.computed() == []

    cheat = TimedCheck(rmsnorm, args, rmsnorm.TOLERANCE["float16"], seed=3, checked=1)
    time_pair(baseline, _launcher(SKIPS_REPEATS, tmp_path), args, reps=3, warmup=1, device=device(), guard=cheat)
    assert "timed call 3 of 4" in cheat.verdict()
