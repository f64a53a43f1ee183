"""Added ops travel through JetStream KV: what one machine added, a service elsewhere writes into its
own ops folder and then finds by name."""
from pathlib import Path

import pytest

from shared import subjects
from shared.broker import make_broker
from shared.userops import find_user_op, publish_op, register_op_file, sync_ops

pytestmark = pytest.mark.nats

DATA = Path(__file__).parent.parent / "data" / "kernelbench"


async def test_an_op_added_here_is_found_on_another_machine_after_a_sync(nats_url, tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    register_op_file(DATA / "row_scale.py", here)
    broker, _ = make_broker(nats_url)
    async with broker:
        await broker.start()
        kv = await broker.key_value(subjects.OPS_BUCKET, history=subjects.OPS_HISTORY)
        await publish_op(kv, "row_scale", here)
        assert find_user_op("row_scale", there) is None
        assert await sync_ops(kv, there) == ["row_scale"]
        assert await sync_ops(kv, there) == []  # already there, unchanged
    assert find_user_op("row_scale", there).SHAPE_PARAMS == ["batch_size", "dim"]
