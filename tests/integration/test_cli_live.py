"""The `kernelloop` command against a live loop: a real nats-server and the deployer as its own
process under a manual deploy policy. Winners are fed as bench.result events, so no kernel runs; the
CLI then shows, approves, rejects, rolls back and follows what the deployer does."""
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from shared import subjects, supervisor
from shared.schemas import (BenchResult, Budget, Campaign, Deploy, DeployApproval, DeployPending, Hardware, Incumbent,
                            KernelKey, WeightedShape)
from shared.telemetry import read_spans
from shared.variants import source_sha256, variant_id

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]
KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
HARDWARE = Hardware(key=KEY.hardware, name="cpu", interpreter=True, torch="test", triton="test")


def winner(campaign_id: str, block: int, speedup: float, incumbent: str | None = None) -> BenchResult:
    """A one-variant round whose variant clears the gate; its source only has to hash to its id."""
    params = {"BLOCK": block}
    source = f"# rmsnorm variant, BLOCK={block}\n"
    campaign = Campaign(campaign_id=campaign_id, key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                        incumbent=Incumbent(variant_id=incumbent), budget=Budget(rounds=1, variants_per_round=1))
    return BenchResult(campaign=campaign, variant_id=variant_id(source, params), source=source,
                       measured_sha256=source_sha256(source), params=params,
                       strategy="grid", round=0, round_size=1, status="ok", weighted_speedup=speedup,
                       speedup_ci_low=speedup - 0.1, speedup_ci_high=speedup + 0.1, hardware=HARDWARE)


def cli(*args: str, env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelloop", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


async def _publish(nats_url: str, subject: str, event) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})
    finally:
        await nc.close()


def publish(nats_url: str, subject: str, event) -> None:
    asyncio.run(_publish(nats_url, subject, event))


@pytest.fixture
def loop(nats_url, tmp_path):
    """The deployer running on its own under the manual policy; yields (nats_url, env for the CLI)."""
    yield from _deployer(nats_url, tmp_path, {"KERNELLOOP_DEPLOY_POLICY": "manual"})


@pytest.fixture
def loop_without_canaries(nats_url, tmp_path):
    """As loop, with deploys final at once: no workload here would ever decide a canary, and a second
    deploy on a key waits for the first one's canary to end."""
    yield from _deployer(nats_url, tmp_path, {"KERNELLOOP_DEPLOY_POLICY": "manual", "KERNELLOOP_CANARY": "0"})


def _deployer(nats_url, tmp_path, service_env: dict):
    env = {**os.environ, "NATS_URL": nats_url, "KERNELLOOP_STATE_DIR": str(tmp_path), "KERNELLOOP_USER": "ci"}
    running = supervisor.start(tmp_path, nats_url=nats_url, env=service_env, services=("deployer",))
    try:
        deadline = time.monotonic() + 90
        while cli("health", "deployer", env=env).returncode != 0:
            assert not running.dead(), (tmp_path / "logs" / "deployer.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the deployer never became healthy"
            time.sleep(0.5)
        yield nats_url, env
    finally:
        running.stop()


def wait_pending(env: dict, campaign_id: str) -> DeployPending:
    tailed = cli("tail", subjects.DEPLOY_PENDING, "--all", "--json", "--count", "1", "--timeout", "30", env=env)
    assert tailed.returncode == 0, tailed.stderr
    lines = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert lines, "no deploy.pending within 30 s"
    pending = DeployPending.model_validate(lines[0]["event"])
    assert pending.campaign_id == campaign_id
    return pending


def test_health_passes_for_a_running_stage_and_fails_for_one_not_running(loop):
    _, env = loop
    ok = cli("health", "deployer", "--json", env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["healthy"] is True
    missing = cli("health", "generator", env=env)
    assert missing.returncode == 1 and "no consumer" in missing.stdout


def test_a_held_winner_is_announced_shown_in_status_and_deployed_when_approved_from_the_cli(loop, tmp_path):
    nats_url, env = loop
    result = winner("camp-cli-approve", 1024, 1.5)
    publish(nats_url, subjects.BENCH_RESULT, result)
    pending = wait_pending(env, "camp-cli-approve")
    assert pending.variant_id == result.variant_id and pending.key == KEY and "manual" in pending.policy

    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["deployed"] == {}
    [campaign] = [c for c in shown["campaigns"] if c["campaign_id"] == "camp-cli-approve"]
    assert campaign["status"] == "awaiting_approval" and campaign["stage"].startswith("awaiting approval")
    assert "camp-cli-approve" in cli("status", env=env).stdout

    approved = cli("approve", "camp-cli-approve", "--by", "alice", "--reason", "looks right", "--json", env=env)
    assert approved.returncode == 0, approved.stderr
    out = json.loads(approved.stdout)
    assert out["status"] == "deployed" and out["by"] == "alice" and out["variant_id"] == result.variant_id

    registry = json.loads(cli("registry", str(KEY), "--json", env=env).stdout)
    [entry] = registry["history"]
    assert entry["approved_by"] == "alice" and entry["variant_id"] == result.variant_id
    status = json.loads(cli("status", "--json", env=env).stdout)
    assert status["deployed"][str(KEY)]["revision"] == out["revision"]
    assert not [c for c in status["campaigns"] if c["campaign_id"] == "camp-cli-approve"]

    again = cli("approve", "camp-cli-approve", "--by", "bob", env=env)
    assert again.returncode == 1 and "not awaiting approval" in again.stderr


def test_a_rejected_winner_is_never_deployed(loop):
    nats_url, env = loop
    publish(nats_url, subjects.BENCH_RESULT, winner("camp-cli-reject", 2048, 1.3))
    wait_pending(env, "camp-cli-reject")
    rejected = cli("reject", "camp-cli-reject", "--by", "carol", "--reason", "too risky before the launch", env=env)
    assert rejected.returncode == 0, rejected.stderr
    assert "rejected by carol: too risky before the launch" in rejected.stdout
    assert json.loads(cli("registry", "--json", env=env).stdout) == {"keys": {}}
    unknown = cli("approve", "camp-nope", env=env)
    assert unknown.returncode == 1 and "no campaign" in unknown.stderr


async def _last(nats_url: str, subject: str, model):
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.jetstream().get_last_msg(subjects.STREAM_NAME, subject)
        return model.model_validate_json(msg.data)
    finally:
        await nc.close()


def test_any_client_may_approve_by_publishing_the_event_and_the_decision_is_on_the_campaign_trace(loop, tmp_path):
    nats_url, env = loop
    result = winner("camp-raw", 1024, 1.4)
    publish(nats_url, subjects.BENCH_RESULT, result)
    wait_pending(env, "camp-raw")
    # What a Go or shell client would do: one JSON message on deploy.approval, no kernelloop code.
    publish(nats_url, subjects.DEPLOY_APPROVAL, DeployApproval(campaign_id="camp-raw", decision="approve", by="dave"))
    deadline = time.monotonic() + 30
    while not json.loads(cli("registry", "--json", env=env).stdout)["keys"]:
        assert time.monotonic() < deadline, "no deploy within 30 s of the approval event"
        time.sleep(0.5)
    deploy = asyncio.run(_last(nats_url, subjects.DEPLOY, Deploy))
    assert deploy.approved_by == "dave" and deploy.variant_id == result.variant_id

    deadline = time.monotonic() + 10
    while not [s for s in read_spans(tmp_path / "traces") if s["name"] == "approve"]:
        assert time.monotonic() < deadline, "no approve span exported"
        time.sleep(0.5)
    spans = read_spans(tmp_path / "traces")
    [approve] = [s for s in spans if s["name"] == "approve"]
    [decide] = [s for s in spans if s["name"] == "decide" and s["attributes"].get("campaign_id") == "camp-raw"]
    assert approve["attributes"]["decided_by"] == "dave"
    assert approve["trace_id"] == decide["trace_id"] == deploy.trace_id
    assert approve["parent_id"] == decide["span_id"], "the decision hangs under the span that held the winner"
    assert decide["attributes"]["decided_by"] == "auto-gate" and "manual" in decide["attributes"]["held"]
    assert [s for s in spans if s["name"] == "deploy" and s["parent_id"] == approve["span_id"]]
    shown = cli("trace", "camp-raw", env=env)
    assert shown.returncode == 0 and "approve" in shown.stdout and "decide" in shown.stdout


def test_rollback_restores_the_previous_variant_and_a_named_revision(loop_without_canaries):
    nats_url, env = loop_without_canaries
    first = winner("camp-rb-1", 1024, 1.5)
    publish(nats_url, subjects.BENCH_RESULT, first)
    wait_pending(env, "camp-rb-1")
    rev1 = json.loads(cli("approve", "camp-rb-1", "--json", env=env).stdout)["revision"]
    second = winner("camp-rb-2", 2048, 1.2, incumbent=first.variant_id)
    publish(nats_url, subjects.BENCH_RESULT, second)
    deadline = time.monotonic() + 30
    while cli("approve", "camp-rb-2", "--json", env=env).returncode != 0:
        assert time.monotonic() < deadline, "second campaign never became approvable"
        time.sleep(0.5)

    back = cli("rollback", str(KEY), "--by", "erin", "--json", env=env)
    assert back.returncode == 0, back.stderr
    out = json.loads(back.stdout)
    assert out["variant_id"] == first.variant_id and out["previous_variant_id"] == second.variant_id
    event = asyncio.run(_last(nats_url, subjects.DEPLOY, Deploy))
    assert event.rollback and event.variant_id == first.variant_id and event.approved_by == "erin"

    forward = cli("rollback", str(KEY), "--to", str(rev1 + 1), "--json", env=env)
    assert forward.returncode == 0, forward.stderr
    assert json.loads(forward.stdout)["variant_id"] == second.variant_id
    same = cli("rollback", str(KEY), "--to", str(rev1 + 1), env=env)
    assert same.returncode == 2 and "already serves" in same.stderr
    history = json.loads(cli("registry", str(KEY), "--json", env=env).stdout)["history"]
    assert [h["variant_id"] for h in history] == [first.variant_id, second.variant_id, first.variant_id,
                                                  second.variant_id]
    assert cli("rollback", "not-a-key", env=env).returncode == 2


def test_tail_prints_events_as_they_arrive(loop):
    nats_url, env = loop
    tail = subprocess.Popen([sys.executable, "-m", "kernelloop", "tail", subjects.BENCH_RESULT, "--count", "1",
                             "--timeout", "60"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(3)  # let it subscribe: it follows from now, not from the start
        result = winner("camp-tail", 512, 1.1)
        publish(nats_url, subjects.BENCH_RESULT, result)
        out, err = tail.communicate(timeout=60)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0, err
    assert "bench.result" in out and "camp-tail" in out and result.variant_id in out and "1.10x" in out
