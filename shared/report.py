"""`kernelloop report`: the loop's history as one HTML page with PNG charts, from the registry and the
event stream: speedup per key over time, campaigns by outcome, variants tried by status."""
import html
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from nats.js import JetStreamContext

from shared import charts, history, subjects
from shared.schemas import BenchResult, Deploy, Hypothesis, KernelKey

OUTCOMES = ("deployed", "awaiting_approval", "running", "exhausted", "rejected")
OUTCOME_COLORS = {"deployed": (44, 160, 44), "awaiting_approval": (255, 187, 120), "running": (31, 119, 180),
                  "exhausted": (127, 127, 127), "rejected": (214, 39, 40)}


@dataclass
class Step:
    time: datetime
    speedup: float  # over the op's fallback, compounded across the deploys that led here
    variant_id: str
    revision: int
    approved_by: str
    rollback: bool


@dataclass
class CampaignRow:
    campaign_id: str
    key: str
    started: datetime | None = None
    status: str = "running"
    variants: Counter = field(default_factory=Counter)  # status -> count
    best_speedup: float | None = None


@dataclass
class History:
    generated_at: datetime
    deploys_by_key: dict[str, list[Step]]
    campaigns: list[CampaignRow]
    interpreter: bool


def compound(deploys: list[Deploy]) -> dict[str, list[Step]]:
    """Each deploy's speedup is over what served before it; chained, they give the speedup over the
    op's fallback. A rollback returns to the variant's earlier standing."""
    out: dict[str, list[Step]] = {}
    standing: dict[tuple[str, str], float] = {}
    for d in sorted(deploys, key=lambda d: (str(d.key), d.revision)):
        key = str(d.key)
        before = standing.get((key, d.previous_variant_id), 1.0) if d.previous_variant_id else 1.0
        level = standing.get((key, d.variant_id), d.speedup) if d.rollback else before * d.speedup
        standing[(key, d.variant_id)] = level
        out.setdefault(key, []).append(Step(d.time, level, d.variant_id, d.revision, d.approved_by, d.rollback))
    return out


async def collect(js: JetStreamContext, progress: Callable[[str], None] | None = None) -> History:
    say = progress or (lambda _: None)
    say("reading deploys")
    deploys = [k.event for k in await history.stream_events(js, subjects.DEPLOY) if isinstance(k.event, Deploy)]
    seen = {(str(d.key), d.revision) for d in deploys}
    for key in await history.keys(await history.kv(js, subjects.REGISTRY_BUCKET)):
        # Deploys older than the stream keeps are still in the registry's history.
        for revision, entry in await history.registry_history(js, key):
            if entry is not None and (key, revision) not in seen:
                deploys.append(Deploy(campaign_id=entry.campaign_id, key=KernelKey.parse(key),
                                      variant_id=entry.variant_id, previous_variant_id=entry.previous_variant_id,
                                      speedup=entry.speedup,
                                      speedup_ci_low=entry.speedup, revision=revision, approved_by=entry.approved_by,
                                      time=entry.deployed_at))
    say("reading campaigns")
    rows: dict[str, CampaignRow] = {}
    for kept in await history.stream_events(js, subjects.HYPOTHESIS):
        if isinstance(kept.event, Hypothesis):
            c = kept.event.campaign
            rows.setdefault(c.campaign_id, CampaignRow(c.campaign_id, str(c.key), kept.event.time))
    say("reading benchmark results")
    interpreter = False
    for kept in await history.stream_events(js, subjects.BENCH_RESULT):
        r = kept.event
        if not isinstance(r, BenchResult):
            continue
        row = rows.setdefault(r.campaign.campaign_id, CampaignRow(r.campaign.campaign_id, str(r.campaign.key), r.time))
        row.variants[r.status] += 1
        if r.weighted_speedup is not None:
            row.best_speedup = max(row.best_speedup or 0.0, r.weighted_speedup)
        interpreter = interpreter or r.hardware.interpreter
    for state in await history.campaign_states(js):
        row = rows.get(state.campaign.campaign_id)
        if row is not None:
            row.status = state.status
    ordered = sorted(rows.values(), key=lambda r: r.started or datetime.min.replace(tzinfo=timezone.utc))
    return History(datetime.now(timezone.utc), compound(deploys), ordered, interpreter)


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%H:%M:%S")


def _swatch(color: tuple[int, int, int], label: str) -> str:
    return (f'<span class="swatch" style="background:rgb{color}"></span>{html.escape(label)}')


def write(data: History, out: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Write report.html and its charts under out; returns the page's path."""
    say = progress or (lambda _: None)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(data.deploys_by_key)
    colors = {k: charts.PALETTE[i % len(charts.PALETTE)] for i, k in enumerate(keys)}
    say("drawing charts")
    series = [(colors[k], [(s.time.timestamp(), s.speedup) for s in data.deploys_by_key[k]]) for k in keys]
    (out / "speedup.png").write_bytes(charts.line_chart(series, y_floor=1.0, x_label=_clock,
                                                           until=data.generated_at.timestamp()))
    outcomes = Counter(c.status for c in data.campaigns)
    (out / "campaigns.png").write_bytes(charts.stacked_bars(
        [[(OUTCOME_COLORS[o], outcomes[o])] for o in OUTCOMES]))
    statuses = list(charts.STATUS_COLORS)
    (out / "variants.png").write_bytes(charts.stacked_bars(
        [[(charts.STATUS_COLORS[s], c.variants[s]) for s in statuses] for c in data.campaigns]))

    note = (" Timings come from Triton's interpreter on a CPU: they measure the interpreter, not a GPU."
            if data.interpreter else "")
    key_rows = "".join(
        f"<tr><td>{_swatch(colors[k], k)}</td><td>{html.escape(s[-1].variant_id)}</td><td>{s[-1].speedup:.2f}x</td>"
        f"<td>{s[-1].revision}</td><td>{len(s)}</td><td>{html.escape(s[-1].approved_by)}</td></tr>"
        for k in keys for s in [data.deploys_by_key[k]])
    campaign_rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(c.campaign_id)}</td><td>{html.escape(c.key)}</td>"
        f"<td>{c.started.strftime('%Y-%m-%d %H:%M') if c.started else ''}</td><td>{c.status}</td>"
        f"<td>{sum(c.variants.values())}</td><td>{f'{c.best_speedup:.2f}x' if c.best_speedup else ''}</td></tr>"
        for i, c in enumerate(data.campaigns, 1))
    page = out / "report.html"
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kernelloop report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 780px; color: #222; }}
h2 {{ margin-top: 1.6em; }} table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: -0.1em; }}
.legend span.item {{ margin-right: 1.2em; }} img {{ max-width: 100%; border: 1px solid #eee; }}
.note {{ color: #666; }}
</style></head>
<body>
<h1>kernelloop report</h1>
<p class="note">Generated {data.generated_at.strftime('%Y-%m-%d %H:%M UTC')}: {len(keys)} kernel keys deployed,
{len(data.campaigns)} campaigns, {sum(sum(c.variants.values()) for c in data.campaigns)} variants benchmarked.{note}</p>

<h2>Speedup per key over time</h2>
<p class="note">Over the op's fallback, compounded across deploys; a step is a deploy or a rollback (UTC).</p>
<img id="speedup" src="speedup.png" alt="speedup per key over time">
<table><tr><th>key</th><th>serves</th><th>speedup</th><th>revision</th><th>deploys</th><th>approved by</th></tr>
{key_rows}</table>

<h2>Campaigns by outcome</h2>
<img id="campaigns" src="campaigns.png" alt="campaigns by outcome">
<p class="legend">{''.join(f'<span class="item">{_swatch(OUTCOME_COLORS[o], f"{i + 1}: {o} ({outcomes[o]})")}</span>'
                           for i, o in enumerate(OUTCOMES))}</p>

<h2>Variants tried, by status, per campaign</h2>
<img id="variants" src="variants.png" alt="variants tried by status per campaign">
<p class="legend">{''.join(f'<span class="item">{_swatch(charts.STATUS_COLORS[s], s)}</span>' for s in statuses)}</p>
<table><tr><th>#</th><th>campaign</th><th>key</th><th>started</th><th>outcome</th><th>variants</th><th>best</th></tr>
{campaign_rows}</table>
<script>
// For a headless browser to check: how many charts loaded and decoded.
window.addEventListener("load", () => {{
  document.body.dataset.chartsRendered = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
""")
    return page
