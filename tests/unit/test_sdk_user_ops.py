"""Ops added with `kernelloop op add` are served through kernelloop.ops like catalog ops: found in
the state folder on first use, dispatched per shape bucket, and counted in the usage windows."""
from pathlib import Path

import pytest
import torch

import kernelloop
from observer import sdk
from observer.sdk import customops
from shared.ops import use_user_ops
from shared.userops import register_op_file
from shared.windows import WindowAggregator

ROW_SCALE = Path(__file__).resolve().parents[1] / "data" / "kernelbench" / "row_scale.py"


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELLOOP_STATE_DIR", str(tmp_path))
    yield tmp_path
    for name in ("row_scale",):
        sdk.ops.__dict__.pop(name, None)
    use_user_ops(None)  # the SDK set it from the settings on first use


def test_an_added_op_is_served_through_kernelloop_ops_and_counted(state_dir):
    op = register_op_file(ROW_SCALE, state_dir / "ops")
    assert "row_scale" in dir(kernelloop.ops)
    x = torch.randn(5, 16)
    windows = WindowAggregator("cpu-interpreter", "test", start=0.0)
    customops.dispatcher.windows, saved = windows, customops.dispatcher.windows
    try:
        y = kernelloop.ops.row_scale(x)
        kernelloop.ops.row_scale(x)
    finally:
        customops.dispatcher.windows = saved
    torch.testing.assert_close(y, op.reference(x))
    (stats,) = windows.flush(now=1.0)
    assert stats.key.op == "row_scale" and stats.calls == 2 and stats.key.bucket == op.shape_bucket([5, 16])


def test_an_unknown_op_names_the_catalog_and_how_to_add_one(state_dir):
    with pytest.raises(AttributeError, match="kernelloop op add"):
        kernelloop.ops.no_such_op
    assert not hasattr(kernelloop.ops, "no_such_op")
