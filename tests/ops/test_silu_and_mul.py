"""silu_and_mul: each value of every SPACE dimension against the torch reference, odd shapes, every dtype."""
import pytest
import torch

from shared import hardware, variants
from shared.ops import silu_and_mul as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: y = silu(x[..., :d]) * x[..., d:], in fp32, one rounding on the way out.

# Each value of each dimension once, the others at DEFAULT: the interpreter is too slow for the
# whole product, and num_warps changes nothing there.
POINTS = [dict(op.DEFAULT, **{name: value}) for name, values in op.SPACE.items() for value in values
          if value != op.DEFAULT[name] and not (name == "num_warps" and hardware.interpreted())] + [op.DEFAULT]
SHAPES = [[3, 2000], [2, 3, 154], [1, 4098], [1, 2]]


def _launcher(params, tmp_path_factory):
    source = variants.render(op.TEMPLATE, params)
    assert variants.static_problems(source) == []
    return variants.load(source, params, variants.variant_id(source, params), tmp_path_factory.getbasetemp() / "variants")


def _rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_on_odd_shapes_in_every_dtype(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    # the dtypes take turns over the shapes (each point sees all three); DEFAULT gets every pair
    pairs = [(i, s, op.DTYPES[i % len(op.DTYPES)]) for i, s in enumerate(SHAPES)]
    if params == op.DEFAULT:
        pairs = [(i, s, d) for i, s in enumerate(SHAPES) for d in op.DTYPES]
    for i, shape, dtype in pairs:
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
