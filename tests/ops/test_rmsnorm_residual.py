"""rmsnorm_residual: each value of every SPACE dimension against the torch reference, odd shapes,
every dtype; both outputs (y and the new residual) checked."""
import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import rmsnorm_residual as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: h = x + residual (fp32), y = h * rsqrt(mean(h^2) + eps) * w; returns (y, h).

POINTS = op_checks.space_points(op)
SHAPES = [[3, 1000], [2, 3, 77], [5, 2049], [1, 1]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(op, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_on_odd_shapes_in_every_dtype(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape, dtype in op_checks.dtype_pairs(op, params, SHAPES):
        x, r, w = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=i)
        y, h = launch(x, r, w, 1e-6)
        ref_y, ref_h = op.reference(x, r, w, 1e-6)
        for out, ref in ((y, ref_y), (h, ref_h)):
            assert out.shape == x.shape and out.dtype == x.dtype
            assert torch.isfinite(out.float()).all()
            assert _rel_err(out, ref) < op.TOLERANCE[dtype], (params, shape, dtype)


def test_a_kernel_that_skips_the_residual_is_caught_by_the_tolerance():
    x, r, w = op.make_inputs([4, 300], torch.float16, "cpu", seed=1)
    wrong_y, _ = op.reference(x, torch.zeros_like(r), w)
    assert _rel_err(wrong_y, op.reference(x, r, w)[0]) > op.TOLERANCE["float16"]


def test_eager_agrees_with_reference():
    x, r, w = op.make_inputs([5, 512], torch.bfloat16, "cpu", seed=2)
    for out, ref in zip(op.eager(x, r, w), op.reference(x, r, w)):
        assert _rel_err(out, ref) < op.TOLERANCE["bfloat16"]


@pytest.mark.parametrize("shape, bucket", [([1, 4096], "h4096-r16"), ([2048, 8192], "h8192-r4k")])
def test_shape_bucket_groups_rows_and_round_trips(shape, bucket):
    assert op.shape_bucket(shape) == bucket
    assert op.shape_bucket(op.example_shapes(bucket)[0]) == bucket


def test_cost_counts_two_reads_two_writes_and_the_weight():
    assert op.cost([16, 4096], torch.float16).bytes_moved == (4 * 16 * 4096 + 4096) * 2
