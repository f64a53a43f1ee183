"""Every point of the RMSNorm template's space against the torch reference, odd shapes included."""
import itertools

import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import rmsnorm, torch_dtype

# torch reference ------------------------------------------------------------------------------
# rmsnorm.reference: y = x * rsqrt(mean(x^2) + eps) * w, accumulated in fp32.

# num_warps changes nothing in the interpreter, so there one value stands for all of them.
WARPS = rmsnorm.SPACE["num_warps"] if not hardware.interpreted() else [4]
POINTS = [dict(BLOCK=b, ROWS=r, num_warps=w)
          for b, r, w in itertools.product(rmsnorm.SPACE["BLOCK"], rmsnorm.SPACE["ROWS"], WARPS)]
SHAPES = [[3, 1000], [5, 2049], [2, 3, 77], [1, 1]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(rmsnorm, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: f"B{p['BLOCK']}-R{p['ROWS']}-W{p['num_warps']}")
def test_every_space_point_matches_reference_on_odd_shapes(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape in enumerate(SHAPES):
        dtype = ("float32", "float16", "bfloat16")[i % 3]
        x, w = rmsnorm.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=i)
        y = launch(x, w, 1e-6)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y.float()).all()
        assert _rel_err(y, rmsnorm.reference(x, w, 1e-6)) < rmsnorm.TOLERANCE[dtype], (params, shape, dtype)


@pytest.mark.parametrize("dtype", rmsnorm.DTYPES)
def test_default_kernel_matches_reference_in_every_dtype(dtype, tmp_path_factory):
    launch = _launcher(rmsnorm.DEFAULT, tmp_path_factory)
    x, w = rmsnorm.make_inputs([7, 1531], torch_dtype(dtype), hardware.device(), seed=7)
    assert _rel_err(launch(x, w, 1e-5), rmsnorm.reference(x, w, 1e-5)) < rmsnorm.TOLERANCE[dtype]


def test_a_wrong_kernel_is_caught_by_the_tolerance(tmp_path_factory):
    # Guards the test itself: dropping the weight must fail the same comparison.
    x, w = rmsnorm.make_inputs([4, 300], torch.float16, "cpu", seed=1)
    wrong = rmsnorm.reference(x, torch.ones_like(w))
    assert _rel_err(wrong, rmsnorm.reference(x, w)) > rmsnorm.TOLERANCE["float16"]


@pytest.mark.parametrize("shape, bucket", [([1, 4096], "h4096-r16"), ([2, 8, 4096], "h4096-r16"),
                                           ([17, 2048], "h2048-r256"), ([4096, 5120], "h5120-r4k"),
                                           ([8192, 64], "h64-rbig")])
def test_shape_bucket_groups_rows_into_decode_and_prefill_ranges(shape, bucket):
    assert rmsnorm.shape_bucket(shape) == bucket
    assert rmsnorm.shape_bucket(rmsnorm.example_shapes(bucket)[0]) == bucket


def test_cost_counts_bytes_of_x_y_and_weight():
    c = rmsnorm.cost([16, 4096], torch.float16)
    assert c.bytes_moved == (2 * 16 * 4096 + 4096) * 2 and c.flops == 4 * 16 * 4096


@pytest.mark.parametrize("dtype", rmsnorm.DTYPES)
def test_eager_fallback_agrees_with_reference_in_every_dtype(dtype):
    # torch's rms_norm: fp32 statistics as the reference's; a weight of another dtype takes the reference
    x, w = rmsnorm.make_inputs([5, 1531], torch_dtype(dtype), "cpu", seed=3)
    for weight in (w, w.float()):
        y = rmsnorm.eager(x, weight, 1e-6)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert _rel_err(y, rmsnorm.reference(x, weight, 1e-6)) < rmsnorm.TOLERANCE[dtype]
