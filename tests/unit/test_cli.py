"""The CLI's validation and schema output: bad events are refused with the field named."""
import json

import pytest

from kernelloop.cli import main, validate_event
from shared import subjects
from shared.schemas import BY_SUBJECT

GOOD = {"key": {"hardware": "cpu-interpreter", "op": "rmsnorm", "dtype": "float16", "bucket": "h4096-r16"},
        "reason": "manual"}


def test_schema_prints_json_schema_of_each_subject(capsys):
    for subject in BY_SUBJECT:
        assert main(["schema", subject]) == 0
        schema = json.loads(capsys.readouterr().out)
        assert "event_id" in schema["properties"]


def test_schema_of_unknown_subject_is_an_error(capsys):
    assert main(["schema", "kernel.nope"]) == 2
    assert "unknown subject" in capsys.readouterr().err


def test_valid_usage_changed_parses():
    event = validate_event(subjects.USAGE_CHANGED, json.dumps(GOOD))
    assert str(event.key) == "cpu-interpreter.rmsnorm.float16.h4096-r16"


@pytest.mark.parametrize("mutate, field", [
    (lambda e: e["key"].update(dtype="float64"), "key.dtype"),
    (lambda e: e.pop("reason"), "reason"),
    (lambda e: e.update(reason="vibes"), "reason"),
    (lambda e: e["key"].update(bucket="a.b"), "key.bucket"),
    (lambda e: e.update(surprise=1), "surprise"),
    (lambda e: e.update(schema_version=99), "schema_version"),
])
def test_invalid_event_error_names_the_field(mutate, field):
    event = json.loads(json.dumps(GOOD))
    mutate(event)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate_event(subjects.USAGE_CHANGED, json.dumps(event))


def test_publish_of_invalid_file_publishes_nothing_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    # No server is needed: validation fails before any connection is made.
    assert main(["publish", subjects.USAGE_CHANGED, str(bad)]) == 2
    assert "invalid usage.changed" in capsys.readouterr().err


def test_op_add_registers_a_kernelbench_file_and_refuses_a_broken_one(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.setenv("KERNELLOOP_STATE_DIR", str(tmp_path))
    example = Path(__file__).resolve().parents[1] / "data" / "kernelbench" / "row_scale.py"
    assert main(["op", "add", str(example)]) == 0
    assert "added op row_scale" in capsys.readouterr().out
    broken = tmp_path / "broken.py"
    broken.write_text("class Model(:\n")
    assert main(["op", "add", str(broken)]) == 2
    assert "syntax error" in capsys.readouterr().err
