"""Every catalog op as a kernelloop custom op: its schema is its reference's signature, it agrees with
the reference eagerly and under torch.compile (one opaque node in the graph), and the dispatcher
keys calls by the op's own shape (matmul's [M, N, K])."""
import pytest
import torch

from observer.sdk import customops, ops
from shared import hardware
from shared.ops import CATALOG, get_op
from shared.windows import WindowAggregator

DEVICE = hardware.device()


def _inputs(op):
    dtype = torch.float32 if "float32" in op.DTYPES else torch.float16
    return op.make_inputs(list(op.ODD_SHAPES[0]), dtype, DEVICE, seed=1)


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.fixture
def dispatcher():
    d = customops.dispatcher
    d.hardware = "cpu-interpreter"
    yield d
    d.table.clear()
    d.windows = None


def test_every_catalog_op_is_registered_with_its_references_schema():
    for name, op in CATALOG.items():
        schema = str(getattr(torch.ops.kernelloop, name).default._schema)
        for param in __import__("inspect").signature(op.reference).parameters:
            assert param in schema, (name, schema)
        assert getattr(ops, name).custom_op is not None


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_op_agrees_with_its_reference_eagerly_and_compiled_as_one_graph_node(name, dispatcher):
    op = get_op(name)
    args = _inputs(op)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    eager = _outputs(getattr(ops, name)(*args))
    compiled = _outputs(torch.compile(getattr(ops, name), backend=backend, fullgraph=True)(*args))
    ref = _outputs(op.reference(*args))
    tolerance = op.TOLERANCE[str(args[0].dtype).removeprefix("torch.")]
    for e, c, r in zip(eager, compiled, ref):
        assert torch.equal(e, c)
        assert ((e.float() - r.float()).norm() / r.float().norm()).item() < tolerance
    assert f"kernelloop.{name}" in graphs[-1]


def test_keyword_arguments_and_defaults_reach_the_dispatcher(dispatcher):
    x, w = get_op("rmsnorm").make_inputs([2, 64], torch.float32, DEVICE, seed=0)
    assert torch.equal(ops.rmsnorm(x, w, eps=1e-6), ops.rmsnorm(x, w))


def test_matmul_calls_are_keyed_and_recorded_by_m_n_k(dispatcher):
    dispatcher.windows = WindowAggregator(dispatcher.hardware, "test", start=0.0)
    x, w = get_op("matmul").make_inputs([3, 37, 53], torch.float16, DEVICE, seed=0)
    ops.matmul(x.reshape(1, 3, 53), w)
    stats = dispatcher.windows.flush(1.0)
    assert [(s.key.op, s.key.bucket) for s in stats] == [("matmul", "n37-k53-m16")]
    assert [list(c.shape) for c in stats[0].shapes] == [[3, 37, 53]]


def test_a_new_hardware_key_is_not_served_from_keys_resolved_before(dispatcher):
    x, w = get_op("rmsnorm").make_inputs([2, 64], torch.float32, DEVICE, seed=0)
    signature = ("rmsnorm", x.dtype, x.shape, w.shape)
    dispatcher.call("rmsnorm", x, w, 1e-6)
    assert dispatcher.sites[signature].key.startswith("cpu-interpreter.")
    dispatcher.hardware = "other-gpu"
    dispatcher.call("rmsnorm", x, w, 1e-6)
    assert dispatcher.sites[signature].key.startswith("other-gpu.")
