"""matmul (x @ w.T, w as in nn.Linear): each value of every SPACE dimension against the torch
reference on odd M, N, K (decode M = 1 included), fp16 and bf16; split-K's reduction checked."""
import pytest
import torch
from support import op_checks

from shared import hardware
from shared.ops import matmul as op
from shared.ops import torch_dtype

# torch reference ------------------------------------------------------------------------------
# op.reference: (x.float() @ w.float().T).to(x.dtype), fp32 accumulation.

# Small blocks keep the interpreter quick; each value of each dimension once on top of them.
BASE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8, "TMA": 0, "num_warps": 4,
        "num_stages": 2}
POINTS = [dict(BASE, **{name: value}) for name, values in op.SPACE.items() for value in values
          if value != BASE[name] and not (name in ("num_warps", "num_stages") and hardware.interpreted())]
POINTS += [BASE, op.DEFAULT]
# [M, N, K]: nothing divides a block; K = 600 lets SPLIT_K up to 16 run with 32-wide K steps; the last
# has 16-byte aligned rows, so TMA = 1 takes its descriptor kernel there (the others fall back)
SHAPES = [[3, 37, 53], [1, 19, 600], [17, 33, 100], [37, 40, 136]]


def _launcher(params, tmp_path_factory):
    return op_checks.launcher(op, params, tmp_path_factory)


_rel_err = op_checks.rel_err


@pytest.mark.parametrize("params", POINTS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_every_space_value_matches_reference_on_odd_shapes(params, tmp_path_factory):
    launch = _launcher(params, tmp_path_factory)
    for i, shape in enumerate(SHAPES):
        dtype = op.DTYPES[i % len(op.DTYPES)]
        x, w = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=i)
        y = launch(x, w)
        assert list(y.shape) == [shape[0], shape[1]] and y.dtype == x.dtype
        assert torch.isfinite(y.float()).all()
        assert _rel_err(y, op.reference(x, w)) < op.TOLERANCE[dtype], (params, shape, dtype)


@pytest.mark.parametrize("dtype", op.DTYPES)
def test_split_k_sums_every_split_in_every_dtype(dtype, tmp_path_factory):
    launch = _launcher(dict(BASE, SPLIT_K=4), tmp_path_factory)
    x, w = op.make_inputs([2, 21, 250], torch_dtype(dtype), hardware.device(), seed=5)
    assert _rel_err(launch(x, w), op.reference(x, w)) < op.TOLERANCE[dtype]


def test_batched_input_keeps_its_leading_dims(tmp_path_factory):
    launch = _launcher(BASE, tmp_path_factory)
    x, w = op.make_inputs([6, 20, 40], torch.float16, hardware.device(), seed=1)
    y = launch(x.reshape(2, 3, 40), w)
    assert y.shape == (2, 3, 20)
    assert _rel_err(y.reshape(6, 20), op.reference(x, w)) < op.TOLERANCE["float16"]


def test_op_shape_of_a_batched_call_is_m_n_k():
    x, w = torch.empty(2, 3, 40), torch.empty(20, 40)
    assert op.op_shape(x, w) == [6, 20, 40]


def test_prune_keeps_gemv_tiles_for_decode_and_drops_tall_tiles():
    from types import SimpleNamespace as S
    decode = [S(shape=[1, 4096, 4096], weight=1.0)]
    prefill = [S(shape=[4096, 4096, 4096], weight=1.0)]
    assert not op.prune(dict(BASE, BLOCK_K=128, SPLIT_K=4), decode)
    assert op.prune(dict(BASE, BLOCK_M=128), decode)
    assert op.prune(dict(BASE, BLOCK_M=128, BLOCK_N=256, BLOCK_K=256, num_stages=5), prefill)
    gemv = dict(BASE, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512)
    assert not op.prune(gemv, decode)
    assert op.prune(gemv, [S(shape=[4, 4096, 4096], weight=1.0)])  # GEMV re-reads w per row
    assert op.prune(dict(gemv, SPLIT_K=2), decode) and op.prune(dict(gemv, TMA=1), decode)
    tma = dict(BASE, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, TMA=1, num_warps=8, num_stages=3)
    assert not op.prune(tma, prefill)
    assert op.prune(dict(tma, num_stages=4), prefill)  # 4 stages and the output tile exceed shared memory
    assert op.prune(dict(tma, SPLIT_K=2), prefill)


@pytest.mark.parametrize("params", [dict(BASE, BLOCK_M=1, BLOCK_N=4, BLOCK_K=64),
                                    dict(BASE, BLOCK_M=32, BLOCK_N=32, TMA=1, GROUP_M=1)],
                         ids=["gemv", "tma"])
@pytest.mark.parametrize("dtype", op.DTYPES)
def test_gemv_and_tma_kernels_on_edges_of_every_block(params, dtype, tmp_path_factory):
    """Rows past M, columns past N and K past the last step in one call: the GEMV's masks and the
    descriptors' zero fill and clipped stores (shapes aligned for TMA, multiples of no block)."""
    launch = _launcher(params, tmp_path_factory)
    for seed, shape in enumerate([[1, 40, 200], [33, 72, 136]]):
        x, w = op.make_inputs(shape, torch_dtype(dtype), hardware.device(), seed=seed)
        y = launch(x, w)
        assert _rel_err(y, op.reference(x, w)) < op.TOLERANCE[dtype], (params, shape, dtype)


@pytest.mark.parametrize("shape, bucket", [([1, 4096, 4096], "n4096-k4096-m1"), ([16, 28672, 4096], "n28672-k4096-m16"),
                                           ([2048, 4096, 14336], "n4096-k14336-m2k")])
def test_shape_bucket_keeps_the_weight_and_groups_m(shape, bucket):
    assert op.shape_bucket(shape) == bucket
    assert op.shape_bucket(op.example_shapes(bucket)[0]) == bucket


def test_cost_counts_each_operand_once_and_two_flops_per_product():
    c = op.cost([2, 8, 16], torch.bfloat16)
    assert c.flops == 2 * 2 * 8 * 16 and c.bytes_moved == (2 * 16 + 8 * 16 + 2 * 8) * 2
