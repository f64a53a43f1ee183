"""Ops from KernelBench-format files: shapes, inputs, reference, cost and launcher signature derived
from Model / get_inputs / get_init_inputs; registration under the state dir; get_op finding them;
and an LLM prompt for an op with no template."""
from pathlib import Path

import pytest
import torch

from generator.database import Attempt
from generator.prompts import PromptContext, build_messages
from shared.ops import CATALOG, get_op
from shared.ops.kernelbench import OpFileError, load_op
from shared.schemas import Campaign, KernelKey, WeightedShape
from shared.userops import register_op_file
from shared.variants import load, render, variant_id

DATA = Path(__file__).parent.parent / "data" / "kernelbench"


def op_from(name: str):
    return load_op((DATA / f"{name}.py").read_text(), name)


def test_sizes_become_the_shape_and_inputs_follow_them():
    op = op_from("row_scale")
    assert op.SHAPE_PARAMS == ["batch_size", "dim"] and op.EXAMPLE_SHAPE == [1024, 16]
    assert op.LAUNCH_SIGNATURE == "launch(x)" and op.TEMPLATE_IS_REFERENCE
    (x,) = op.make_inputs([5, 33], torch.float16, "cpu", seed=1)
    assert (x.shape, x.dtype) == ((5, 33), torch.float16)
    assert torch.equal(x, op.make_inputs([5, 33], torch.float16, "cpu", seed=1)[0])
    assert not torch.equal(x, op.make_inputs([5, 33], torch.float16, "cpu", seed=2)[0])
    assert op.op_shape(x) == [5, 33]
    assert op.shape_bucket([5, 33]) == "s5x33" and op.example_shapes("s5x33") == [[5, 33]]
    assert op.ODD_SHAPES == ([511, 7],)
    assert op.cost([5, 33], torch.float16).bytes_moved == 2 * 5 * 33 * 2


def test_reference_runs_in_float32_and_casts_back():
    op = op_from("row_scale")
    (x,) = op.make_inputs([4, 8], torch.float16, "cpu", seed=0)
    y = op.reference(x)
    expected = x.float() / (x.float().abs().amax(-1, keepdim=True) + 1e-6)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, expected.half())


def test_model_parameters_become_launcher_arguments_drawn_fresh_per_seed():
    op = op_from("linear_gelu")
    assert op.SHAPE_PARAMS == ["batch_size", "in_features", "out_features"]
    assert op.LAUNCH_SIGNATURE == "launch(x, linear_weight, linear_bias)"
    x, w, b = op.make_inputs([3, 24, 8], torch.float32, "cpu", seed=5)
    assert (x.shape, w.shape, b.shape) == ((3, 24), (8, 24), (8,))
    assert op.op_shape(x, w, b) == [3, 24, 8]
    torch.testing.assert_close(op.reference(x, w, b), torch.nn.functional.gelu(x @ w.T + b))
    assert not torch.equal(w, op.make_inputs([3, 24, 8], torch.float32, "cpu", seed=6)[1])
    assert op.cost([3, 24, 8], torch.float32).flops == 2 * 3 * 24 * 8


def test_the_fallback_launcher_serves_the_reference(tmp_path, user_ops):
    register_op_file(DATA / "row_scale.py", user_ops)
    op = get_op("row_scale")
    source = render(op.TEMPLATE, op.DEFAULT)
    launch = load(source, op.DEFAULT, variant_id(source, op.DEFAULT), tmp_path / "cache")
    (x,) = op.make_inputs([3, 5], torch.float32, "cpu", seed=0)
    assert torch.equal(launch(x), op.reference(x))


def test_an_added_op_is_found_by_name_and_listed_when_unknown(user_ops):
    with pytest.raises(KeyError, match="row_scale"):
        get_op("row_scale")
    op = register_op_file(DATA / "row_scale.py", user_ops)
    assert (user_ops / "row_scale.py").exists()
    assert get_op("row_scale").NAME == op.NAME == "row_scale"
    with pytest.raises(KeyError, match="known ops: .*row_scale"):
        get_op("nosuchop")


@pytest.mark.parametrize("text, reason", [
    ("import torch\ndef get_inputs():\n    return []\ndef get_init_inputs():\n    return []\n", "no `Model`"),
    ("def broken(:\n", "syntax error"),
    ((DATA / "row_scale.py").read_text().replace("x[i].abs().max()", "x[i].nosuch()"), "reference fails"),
])
def test_a_broken_file_is_refused_naming_what_is_wrong(tmp_path, text, reason):
    path = tmp_path / "bad_op.py"
    path.write_text(text)
    with pytest.raises(OpFileError, match=reason):
        register_op_file(path, tmp_path / "ops")
    assert not (tmp_path / "ops" / "bad_op.py").exists()


def test_a_built_in_op_cannot_be_replaced(tmp_path):
    path = tmp_path / "rmsnorm.py"
    path.write_text((DATA / "row_scale.py").read_text())
    with pytest.raises(OpFileError, match="built in"):
        register_op_file(path, tmp_path / "ops")
    assert "rmsnorm" in CATALOG


def test_prompt_for_an_op_without_template_carries_the_model_and_asks_for_a_first_kernel():
    op = op_from("row_scale")
    key = KernelKey(hardware="cpu-interpreter", op="row_scale", dtype="float32", bucket="s1024x16")
    campaign = Campaign(key=key, profile=[WeightedShape(shape=[1024, 16], weight=1.0)])
    messages = build_messages(PromptContext(op, campaign, 0), [Attempt(round=0, model="m", status="no_code")])
    prompt = messages[1]["content"]
    assert "class Model(nn.Module)" in prompt and "launch(x)" in prompt
    assert "write the first Triton kernel" in prompt and "shape [1024, 16]" in prompt
    assert "round 0 (m): no_code" in prompt
