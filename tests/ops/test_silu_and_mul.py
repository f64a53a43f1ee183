"""silu_and_mul: each value of every SPACE dimension against the torch reference, odd shapes, every dtype."""
import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import silu_and_mul as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: y = silu(x[..., :d]) * x[..., d:], in fp32, one rounding on the way out.

POINTS = op_checks.space_points(op)
SHAPES = [[3, 2000], [2, 3, 154], [1, 4098], [1, 2]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(op, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_on_odd_shapes_in_every_dtype(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape, dtype in op_checks.dtype_pairs(op, params, SHAPES):
        (x,) = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=i)
        y = launch(x)
        assert list(y.shape) == shape[:-1] + [shape[-1] // 2] and y.dtype == x.dtype
        assert torch.isfinite(y.float()).all()
        assert _rel_err(y, op.reference(x)) < op.TOLERANCE[dtype], (params, shape, dtype)


def test_a_kernel_that_swaps_gate_and_up_is_caught_by_the_tolerance():
    (x,) = op.make_inputs([4, 300], torch.float16, "cpu", seed=1)
    swapped = op.reference(torch.cat([x[..., 150:], x[..., :150]], dim=-1))
    assert _rel_err(swapped, op.reference(x)) > op.TOLERANCE["float16"]


def test_eager_agrees_with_reference():
    (x,) = op.make_inputs([5, 512], torch.bfloat16, "cpu", seed=2)
    assert _rel_err(op.eager(x), op.reference(x)) < op.TOLERANCE["bfloat16"]


def test_odd_last_dim_is_refused_with_the_shape_named():
    with pytest.raises(ValueError, match="even last dim"):
        op.make_inputs([2, 7], torch.float32, "cpu", seed=0)


@pytest.mark.parametrize("shape, bucket", [([1, 28672], "h28672-r16"), ([4, 8, 28672], "h28672-r256"),
                                           ([2048, 57344], "h57344-r4k"), ([8192, 64], "h64-rbig")])
def test_shape_bucket_groups_rows_and_round_trips(shape, bucket):
    assert op.shape_bucket(shape) == bucket
    assert op.shape_bucket(op.example_shapes(bucket)[0]) == bucket


def test_cost_counts_x_read_and_half_width_y_written():
    assert op.cost([16, 4096], torch.bfloat16).bytes_moved == (16 * 4096 + 16 * 2048) * 2
