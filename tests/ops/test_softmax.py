"""softmax: each value of every SPACE dimension against the torch reference, odd shapes (long rows
through the online and the split paths), every dtype."""
import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import softmax as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: torch.softmax in fp64 over the last dim.

POINTS = op_checks.space_points(op)
# 3000 > the default block (online path) and splits unevenly; 77 leaves masked lanes in one block
SHAPES = [[2, 3000], [2, 2, 77], [1, 1]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(op, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_on_odd_shapes_in_every_dtype(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape, dtype in op_checks.dtype_pairs(op, params, SHAPES):
        (x,) = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=i)
        y = launch(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y.float()).all()
        assert _rel_err(y, op.reference(x)) < op.TOLERANCE[dtype], (params, shape, dtype)


def test_inputs_overflow_exp_unless_the_row_max_is_subtracted():
    (x,) = op.make_inputs([2, 64], torch.float32, "cpu", seed=0)
    assert not torch.isfinite(torch.exp(x)).all()


def test_split_and_online_paths_agree_on_a_long_row(tmp_path_factory):
    (x,) = op.make_inputs([1, 5000], torch.float32, hardware.device(), seed=3)
    online = _launcher(dict(op.DEFAULT, BLOCK=512), tmp_path_factory)(x)
    split = _launcher(dict(op.DEFAULT, BLOCK=512, SPLIT=8), tmp_path_factory)(x)
    assert _rel_err(split, online) < 1e-6


@pytest.mark.parametrize("shape, bucket", [([1, 128256], "n128256-r16"), ([32, 32, 2048], "n2048-r4k"),
                                           ([8, 28672], "n28672-r16"), ([5000, 64], "n64-rbig")])
def test_shape_bucket_groups_rows_and_round_trips(shape, bucket):
    assert op.shape_bucket(shape) == bucket
    assert op.shape_bucket(op.example_shapes(bucket)[0]) == bucket


def test_prune_keeps_splits_for_few_long_rows_only():
    from types import SimpleNamespace as S
    few_long, many = [S(shape=[1, 128256], weight=1.0)], [S(shape=[4096, 128256], weight=1.0)]
    point = dict(op.DEFAULT, BLOCK=4096, SPLIT=16)
    assert not op.prune(point, few_long) and op.prune(point, many)
