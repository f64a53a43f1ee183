"""docs/asyncapi.json is the reference for clients in other languages: it must be what the code
generates now, describe every subject with its schema, and the README's `nats pub` example must be
an event that schema accepts."""
import json
import re
from pathlib import Path

from kernelloop.cli import validate_event
from shared import subjects
from shared.asyncapi import build_app
from shared.schemas import BY_SUBJECT

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.json"


def generated() -> dict:
    return build_app().schema.to_specification().to_jsonable()


def test_committed_asyncapi_document_is_what_the_code_generates():
    assert json.loads(DOC.read_text()) == generated(), \
        "docs/asyncapi.json is stale: regenerate it with `make asyncapi`"


def test_every_subject_has_a_channel_whose_messages_carry_its_schema():
    doc = generated()
    schemas = doc["components"]["schemas"]
    for subject in (s for s in subjects.ALL if not s.endswith(">")):
        channels = [c for c in doc["channels"].values() if c["address"] == subject]
        assert channels, f"no channel for {subject}"
        payloads = set()
        for channel in channels:
            for ref in channel["messages"].values():
                message = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
                payloads.add(message["payload"]["$ref"].rsplit("/", 1)[1])
        model = BY_SUBJECT[subject].__name__
        assert model in payloads, f"{subject}: payloads {payloads}, expected {model}"
        assert schemas[model]["additionalProperties"] is False, "unknown fields are refused, and the doc says so"


def test_readme_nats_pub_example_is_a_valid_event_on_a_documented_subject():
    readme = (ROOT / "README.md").read_text()
    assert "docs/asyncapi.json" in readme
    match = re.search(r"nats [^\n]*?pub ([a-z.]+) '(\{.*?\})'", readme)
    assert match, "no `nats pub SUBJECT '{...}'` example in the README"
    subject, payload = match.groups()
    assert subject in BY_SUBJECT
    validate_event(subject, payload)  # raises, naming the field, when the example drifts from the schema
