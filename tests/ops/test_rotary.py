"""rotary: each value of every SPACE dimension against the torch reference, in both layouts (GPT-NeoX
and GPT-J), odd shapes, every dtype."""
import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import rotary as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: pairs (i, i + d/2) for NeoX or (2i, 2i+1) for GPT-J rotated by each token's angle.

POINTS = op_checks.space_points(op)
SHAPES = [[3, 5, 10], [1, 1, 2], [7, 3, 66]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(op, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_in_both_layouts(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape in enumerate(SHAPES):
        dtype = op.DTYPES[i % len(op.DTYPES)]
        for seed in (2 * i, 2 * i + 1):  # even seeds NeoX, odd seeds GPT-J
            x, cos, sin, interleaved = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=seed)
            assert interleaved == bool(seed % 2)
            y = launch(x, cos, sin, interleaved)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert _rel_err(y, op.reference(x, cos, sin, interleaved)) < op.TOLERANCE[dtype], (params, shape, dtype, seed)


@pytest.mark.parametrize("dtype", op.DTYPES)
def test_default_kernel_matches_reference_in_every_dtype(dtype, tmp_path_factory):
    launch = _launcher(op.DEFAULT, tmp_path_factory)
    for seed in (0, 1):
        x, cos, sin, interleaved = op.make_inputs([5, 6, 34], torch_dtype(dtype), hardware.device(), seed=seed)
        assert _rel_err(launch(x, cos, sin, interleaved), op.reference(x, cos, sin, interleaved)) < op.TOLERANCE[dtype]


def test_the_two_layouts_differ_so_a_wrong_layout_is_caught():
    x, cos, sin, _ = op.make_inputs([4, 2, 64], torch.float32, "cpu", seed=0)
    assert _rel_err(op.reference(x, cos, sin, True), op.reference(x, cos, sin, False)) > op.TOLERANCE["float32"]


def test_rotation_keeps_each_pairs_norm():
    x, cos, sin, interleaved = op.make_inputs([3, 2, 16], torch.float32, "cpu", seed=1)
    y = op.reference(x, cos, sin, interleaved)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_a_shape_without_heads_is_refused_with_the_shape_named():
    with pytest.raises(ValueError, match=r"\[tokens, heads, head_dim\]"):
        op.make_inputs([4, 64], torch.float32, "cpu", seed=0)


@pytest.mark.parametrize("shape, bucket", [([1, 32, 128], "d128-h32-t16"), ([2048, 8, 128], "d128-h8-t4k")])
def test_shape_bucket_keeps_heads_and_head_dim_and_round_trips(shape, bucket):
    assert op.shape_bucket(shape) == bucket
    assert op.shape_bucket(op.example_shapes(bucket)[0]) == bucket
