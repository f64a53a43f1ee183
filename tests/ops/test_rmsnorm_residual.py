"""rmsnorm_residual: each value of every SPACE dimension against the torch reference, odd shapes,
every dtype; both outputs (y and the new residual) checked."""
import pytest
import torch

from shared import hardware, variants
from shared.ops import rmsnorm_residual as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: h = x + residual (fp32), y = h * rsqrt(mean(h^2) + eps) * w; returns (y, h).

POINTS = [dict(op.DEFAULT, **{name: value}) for name, values in op.SPACE.items() for value in values
          if value != op.DEFAULT[name] and not (name == "num_warps" and hardware.interpreted())] + [op.DEFAULT]
SHAPES = [[3, 1000], [2, 3, 77], [5, 2049], [1, 1]]


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
