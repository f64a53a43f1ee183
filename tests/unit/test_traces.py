"""Finding a campaign's trace in exported spans and drawing it."""
from shared import traces


def _span(sid, parent, name, service, start, end, **attrs):
    return {"trace_id": "t" * 32, "span_id": sid, "parent_id": parent, "name": name, "service": service,
            "start_ns": start, "end_ns": end, "status": "UNSET", "attributes": attrs, "links": []}


SPANS = [
    _span("a", None, "detect", "detector", 0, 1_000_000, kernel_key="cpu.rmsnorm.float16.h4096-r16"),
    _span("b", "a", "hypothesise", "detector", 1_000_000, 2_000_000, campaign_id="c1"),
    _span("c", "b", "generate", "generator", 2_000_000, 3_000_000, campaign_id="c1", round=0),
    {**_span("x", None, "other", "observer", 0, 5, campaign_id="c2"), "trace_id": "u" * 32},
]


def test_campaign_id_finds_its_trace():
    assert traces.find_trace_id(SPANS, "c1") == "t" * 32
    assert traces.find_trace_id(SPANS, "t" * 32) == "t" * 32
    assert traces.find_trace_id(SPANS, "nope") is None


def test_services_of_a_trace_exclude_other_traces():
    assert traces.services_in(SPANS, "t" * 32) == ["detector", "generator"]


def test_tree_nests_children_under_parents_with_durations():
    text = traces.format_tree(SPANS, "t" * 32).splitlines()
    assert text[0].startswith("trace " + "t" * 32) and "detector, generator" in text[0]
    assert "kernel_key=cpu.rmsnorm.float16.h4096-r16" in text[1]
    names = [next(w for w in ("hypothesise", "generate", "detect") if f" {w} " in line + " ") for line in text[1:]]
    assert names == ["detect", "hypothesise", "generate"]
    assert "    generate" in text[3], "grandchild is indented twice"
    assert "1.0 ms" in text[1]
