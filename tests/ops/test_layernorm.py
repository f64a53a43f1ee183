"""layernorm: each value of every SPACE dimension against the torch reference, odd shapes, every dtype."""
import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import layernorm as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: F.layer_norm in fp32 with weight and bias.

POINTS = op_checks.space_points(op)
SHAPES = [[3, 1000], [2, 3, 77], [5, 2049], [1, 1]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(op, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_on_odd_shapes_in_every_dtype(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape, dtype in op_checks.dtype_pairs(op, params, SHAPES):
        x, w, b = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=i)
        y = launch(x, w, b, 1e-5)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y.float()).all()
        assert _rel_err(y, op.reference(x, w, b, 1e-5)) < op.TOLERANCE[dtype], (params, shape, dtype)


def test_a_kernel_that_drops_the_bias_is_caught_by_the_tolerance():
    x, w, b = op.make_inputs([4, 300], torch.float16, "cpu", seed=1)
    assert _rel_err(op.reference(x, w, torch.zeros_like(b)), op.reference(x, w, b)) > op.TOLERANCE["float16"]


def test_inputs_have_a_mean_far_from_zero_so_naive_variance_cancels():
    x, _, _ = op.make_inputs([2, 256], torch.float32, "cpu", seed=0)
    assert x.mean().abs() > 5 * x.std()


@pytest.mark.parametrize("shape, bucket", [([1, 4096], "h4096-r16"), ([300, 8192], "h8192-r4k")])
def test_shape_bucket_groups_rows_and_round_trips(shape, bucket):
    assert op.shape_bucket(shape) == bucket
    assert op.shape_bucket(op.example_shapes(bucket)[0]) == bucket
