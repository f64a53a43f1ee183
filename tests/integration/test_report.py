"""`kernelloop report` from a real loop's history: the deployer deploys twice on one key, then the
report's page names both deploys and its PNG charts draw the key's speedup, the campaigns' outcomes
and the variants by status."""
import asyncio
import json
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone

import nats
import pytest

from deployer.app import build_app
from kernelloop.cli import main
from shared import charts, subjects
from shared.report import OUTCOME_COLORS, compound
from shared.schemas import (BenchResult, Budget, Campaign, Deploy, Hardware, Hypothesis, Incumbent, KernelKey,
                            WeightedShape)
from shared.settings import Settings
from shared.variants import source_sha256, variant_id

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
HARDWARE = Hardware(key=KEY.hardware, name="cpu", interpreter=True, torch="test", triton="test")


def campaign(campaign_id: str, incumbent: str | None = None) -> Campaign:
    return Campaign(campaign_id=campaign_id, key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                    incumbent=Incumbent(variant_id=incumbent), budget=Budget(rounds=1, variants_per_round=2))


def result(c: Campaign, block: int, status: str, speedup: float | None, size: int) -> BenchResult:
    source, params = f"# BLOCK={block}\n", {"BLOCK": block}
    return BenchResult(campaign=c, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=0, round_size=size, status=status, weighted_speedup=speedup,
                       speedup_ci_low=speedup and speedup - 0.05, speedup_ci_high=speedup and speedup + 0.05,
                       hardware=HARDWARE)


async def run_history(nats_url: str, tmp_path) -> tuple[str, str]:
    """Two campaigns through a real deployer: the second beats the first's winner. Returns both winners."""
    # Deploys final at once: no workload here reports on a canary, and the second deploy on the key
    # would wait for the first one's canary to end.
    app = build_app(Settings(NATS_URL=nats_url, KERNELLOOP_STATE_DIR=str(tmp_path), KERNELLOOP_CANARY=False))
    await app.start()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()

        async def send(subject, event):
            await js.publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})

        async def deploys() -> int:
            info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=subjects.DEPLOY)
            return (info.state.subjects or {}).get(subjects.DEPLOY, 0)

        first = campaign("camp-report-1")
        await send(subjects.HYPOTHESIS, Hypothesis(campaign=first, reason="new_shape",
                                                   time=datetime.now(timezone.utc) - timedelta(minutes=5)))
        win1 = result(first, 1024, "ok", 1.5, 2)
        for r in (win1, result(first, 2048, "incorrect", None, 2)):
            await send(subjects.BENCH_RESULT, r)
        deadline = time.monotonic() + 20
        while await deploys() < 1:
            assert time.monotonic() < deadline, "first deploy missing"
            await asyncio.sleep(0.1)
        second = campaign("camp-report-2", incumbent=win1.variant_id)
        await send(subjects.HYPOTHESIS, Hypothesis(campaign=second, reason="time_share_shift"))
        win2 = result(second, 4096, "ok", 1.2, 1)
        await send(subjects.BENCH_RESULT, win2)
        while await deploys() < 2:
            assert time.monotonic() < deadline, "second deploy missing"
            await asyncio.sleep(0.1)
        return win1.variant_id, win2.variant_id
    finally:
        await nc.close()
        await app.stop()


def test_compound_speedup_chains_deploys_and_a_rollback_returns_to_the_earlier_level():
    t = datetime.now(timezone.utc)
    deploys = [Deploy(campaign_id="a", key=KEY, variant_id="v1", speedup=1.5, speedup_ci_low=1.4, revision=1,
                      approved_by="auto-gate", time=t),
               Deploy(campaign_id="b", key=KEY, variant_id="v2", previous_variant_id="v1", speedup=1.2,
                      speedup_ci_low=1.1, revision=2, approved_by="auto-gate", time=t),
               Deploy(campaign_id="a", key=KEY, variant_id="v1", previous_variant_id="v2", speedup=1.5,
                      speedup_ci_low=1.5, revision=3, approved_by="erin", rollback=True, time=t)]
    levels = [round(s.speedup, 6) for s in compound(deploys)[str(KEY)]]
    assert levels == [1.5, 1.8, 1.5]


@pytest.mark.nats
def test_report_page_and_charts_show_the_loops_history(nats_url, tmp_path, monkeypatch, capsys):
    v1, v2 = asyncio.run(run_history(nats_url, tmp_path))
    monkeypatch.setenv("NATS_URL", nats_url)
    out = tmp_path / "report"
    capsys.readouterr()  # the deployer's log lines
    assert main(["report", "--out", str(out), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    page = (out / "report.html").read_text()
    assert written["html"] == str(out / "report.html") and written["campaigns"] == 2
    assert v2 in page and "1.80x" in page, "the key's current variant and its compounded speedup"
    assert "camp-report-1" in page and "camp-report-2" in page and "interpreter" in page
    for name in ("speedup", "campaigns", "variants"):
        assert f'src="{name}.png"' in page

    speedup = charts.colors_in(charts.read_png((out / "speedup.png").read_bytes()))
    assert charts.PALETTE[0] in speedup, "the key's speedup line is not drawn"
    outcomes = charts.colors_in(charts.read_png((out / "campaigns.png").read_bytes()))
    assert OUTCOME_COLORS["deployed"] in outcomes and OUTCOME_COLORS["rejected"] not in outcomes
    variants = charts.colors_in(charts.read_png((out / "variants.png").read_bytes()))
    assert {charts.STATUS_COLORS["ok"], charts.STATUS_COLORS["incorrect"]} <= variants
    assert charts.STATUS_COLORS["timeout"] not in variants


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome",
                                           "headless_shell") if shutil.which(n)), None)


@pytest.mark.nats
@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium binary (chromium, chromium-browser, "
                                             "google-chrome, chrome or headless_shell) on PATH")
def test_report_charts_render_in_headless_chromium(nats_url, tmp_path, monkeypatch):
    asyncio.run(run_history(nats_url, tmp_path))
    monkeypatch.setenv("NATS_URL", nats_url)
    assert main(["report", "--out", str(tmp_path / "report")]) == 0
    dom = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--allow-file-access-from-files",
                          "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "report" / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-charts-rendered="3"' in dom.stdout, dom.stderr[-2000:]
