"""Reading campaigns back from exported spans: find a campaign's trace, list its services, and
draw it as a tree with durations and a waterfall bar (what `kernelloop trace` prints)."""
from collections import defaultdict

# Attributes worth showing beside a span's name, in this order.
SHOWN = ("kernel_key", "campaign_id", "variant_id", "strategy", "round", "status", "stage", "action", "speedup",
         "speedup_ci_low", "speedup_ci_high", "windows", "decision", "decided_by", "approved_by", "reason")
LONGEST = 60  # characters of one attribute value; a tree line should stay one line


def find_trace_id(spans: list[dict], ident: str) -> str | None:
    """ident is a trace id, or a campaign id that some span of the trace carries as an attribute."""
    ident = ident.strip().lower()
    if any(s["trace_id"] == ident for s in spans):
        return ident
    for s in spans:
        if s["attributes"].get("campaign_id") == ident:
            return s["trace_id"]
    return None


def campaigns(spans: list[dict]) -> dict[str, str]:
    """campaign id -> trace id, for every campaign that left a span."""
    found = {}
    for s in spans:
        cid = s["attributes"].get("campaign_id")
        if cid and cid not in found:
            found[cid] = s["trace_id"]
    return found


def spans_of(spans: list[dict], trace_id: str) -> list[dict]:
    return [s for s in spans if s["trace_id"] == trace_id]


def services_in(spans: list[dict], trace_id: str) -> list[str]:
    return sorted({s["service"] for s in spans_of(spans, trace_id)})


def _short(value) -> str:
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return text if len(text) <= LONGEST else text[:LONGEST - 1] + "…"


def format_tree(spans: list[dict], trace_id: str, width: int = 30) -> str:
    mine = sorted(spans_of(spans, trace_id), key=lambda s: s["start_ns"])
    if not mine:
        return f"no spans for trace {trace_id}"
    ids = {s["span_id"] for s in mine}
    children = defaultdict(list)
    roots = []
    for s in mine:
        if s["parent_id"] in ids:
            children[s["parent_id"]].append(s)
        else:
            roots.append(s)  # the root, or a span whose parent was not exported (yet)
    t0 = min(s["start_ns"] for s in mine)
    t1 = max(s["end_ns"] or s["start_ns"] for s in mine)
    total = max(t1 - t0, 1)
    services = sorted({s["service"] for s in mine})
    lines = [f"trace {trace_id}  {total / 1e9:.2f} s  services: {', '.join(services)}"]

    def walk(span: dict, depth: int) -> None:
        start, end = span["start_ns"] - t0, (span["end_ns"] or span["start_ns"]) - t0
        lo, hi = int(start / total * width), max(int(end / total * width), int(start / total * width) + 1)
        bar = " " * lo + "█" * (hi - lo) + " " * (width - hi)
        attrs = " ".join(f"{k}={_short(span['attributes'][k])}" for k in SHOWN
                         if k in span["attributes"] and k != "campaign_id")
        name = "  " * depth + span["name"]
        flag = " !" if span.get("status") == "ERROR" else ""
        lines.append(f"|{bar}| {(end - start) / 1e6:9.1f} ms  {span['service']:<11} {name}{flag}  {attrs}".rstrip())
        for child in children[span["span_id"]]:
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)
