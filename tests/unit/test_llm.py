"""The LLM strategy through the real `openai` client against a local scripted server: retries on
429 and 500, timeouts, code parsed from rewrites and edits, every bad answer ending as its status
with the reason in the next prompt, the token budget, and the calls on the trace."""
import random

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from generator.database import CampaignRecord
from generator.evolve import LLMStrategy
from generator.llm import LLMClient, LLMConfig, ModelChoice, Price, parse_answer, parse_models, parse_prices
from generator.prompts import PromptContext
from generator.search import propose_round
from shared.ops import rmsnorm
from shared.schemas import Budget, Campaign, KernelKey, WeightedShape
from shared.settings import Settings
from shared.variants import render, variant_id
from support import rmsnorm_answers as answers
from support.llm_server import ScriptedLLM, answer, error, slow

BASELINE = render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT)


def config(url: str, **kw) -> LLMConfig:
    fields = dict(base_url=url, api_key="test", models=[ModelChoice("model-a", 1.0)], timeout_s=5.0, retries=2,
                  backoff_s=0.01, max_tokens=1000, token_budget=100_000)
    return LLMConfig(**{**fields, **kw})


def campaign(hints=()) -> Campaign:
    key = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
    return Campaign(campaign_id="llm-1", key=key, profile=[WeightedShape(shape=[16, 1024], weight=1.0)],
                    budget=Budget(rounds=2, variants_per_round=1), hints=list(hints))


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def run_round(server: ScriptedLLM, tracer, n=1, record=None, cfg=None, c=None):
    c = c or campaign()
    record = record or CampaignRecord(campaign_id=c.campaign_id)
    strategy = LLMStrategy(LLMClient(cfg or config(server.base_url)), PromptContext(rmsnorm, c, 0), record,
                           random.Random(0), tracer)
    return propose_round(rmsnorm, c, 0, n, set(), [], strategy=strategy), record


# ---- settings and parsing -----------------------------------------------------------------------

def test_models_parse_with_weights_and_colons_in_names():
    assert parse_models("model-a:0.7, model-b:0.3") == [ModelChoice("model-a", 0.7), ModelChoice("model-b", 0.3)]
    assert parse_models("llama3:8b") == [ModelChoice("llama3:8b", 1.0)]
    with pytest.raises(ValueError, match="weight"):
        parse_models("a:0")


def test_no_endpoint_means_no_llm_and_a_url_without_models_is_an_error():
    assert LLMConfig.from_settings(Settings()) is None
    with pytest.raises(ValueError, match="KERNELLOOP_LLM_MODELS"):
        LLMConfig.from_settings(Settings(OPENAI_BASE_URL="http://127.0.0.1:9/v1"))
    cfg = LLMConfig.from_settings(Settings(OPENAI_BASE_URL="http://x/v1", KERNELLOOP_LLM_MODELS="a:3,b:1"))
    assert [m.name for m in cfg.models] == ["a", "b"]
    picks = [cfg.pick(random.Random(i)) for i in range(200)]
    assert 120 < picks.count("a") < 180


def test_answer_parsing_takes_the_block_with_launch_or_applies_edits():
    assert parse_answer(answers.GOOD, None).source.strip() == answers.FAST_SOURCE.strip()
    assert parse_answer(answers.PROSE, None).kind == "none"
    edited = parse_answer(answers.BLOCK_EDIT, BASELINE)
    assert edited.kind == "diff" and "BLOCK = 1024" in edited.source and "BLOCK = 512\n" not in edited.source
    bad = parse_answer(answers.BLOCK_EDIT.replace("BLOCK = 512", "BLOCK = 333"), BASELINE)
    assert bad.source is None and "SEARCH text is not in the parent" in bad.problem


# ---- the client: retries, back-off, timeouts ----------------------------------------------------

def test_rate_limit_and_server_error_are_retried_then_answered():
    with ScriptedLLM([error(429, retry_after=0.05), error(500), answer("hi")]) as server:
        waits = []
        client = LLMClient(config(server.base_url), sleep=waits.append)
        result = client.complete([{"role": "user", "content": "x"}], "model-a", 100)
    assert (result.status, result.text, result.attempts) == ("ok", "hi", 3)
    assert waits == [0.05, 0.02]  # the server's Retry-After, then the back-off's second step
    assert (result.prompt_tokens, result.completion_tokens) == (100, 200)


def test_an_answer_slower_than_the_timeout_is_retried_and_then_given_up():
    with ScriptedLLM([slow(2.0), slow(2.0)]) as server:
        client = LLMClient(config(server.base_url, timeout_s=0.3, retries=1), sleep=lambda s: None)
        result = client.complete([{"role": "user", "content": "x"}], "model-a", 100)
    assert (result.status, result.attempts) == ("timeout", 2)


# ---- the strategy: every kind of answer ends as its status --------------------------------------

def test_bad_answers_end_as_their_status_with_the_reason_in_the_next_prompt(spans):
    tracer, exporter = spans
    script = [answer(answers.SYNTAX_ERROR), answer(answers.TORCH_OPS), answer(answers.PROSE), answer(answers.GOOD)]
    with ScriptedLLM(script) as server:
        ready, record = run_round(server, tracer)
    assert [a.status for a in record.attempts] == ["rejected", "rejected", "no_code", "proposed"]
    assert len(ready) == 1 and ready[0].strategy == "llm" and ready[0].params == {}
    assert ready[0].variant_id == variant_id(answers.FAST_SOURCE.strip() + "\n", {})
    assert "syntax error" in server.user_prompt(1)
    assert "torch.rsqrt" in server.user_prompt(2) and "@triton.jit" in server.user_prompt(2)
    assert "no ```python code block" in server.user_prompt(3)
    first = server.user_prompt(0)
    assert "shape [16, 1024]: weight 1" in first and "def reference" in first and "BLOCK = 512" in first
    calls = [s for s in exporter.get_finished_spans() if s.name == "llm.call"]
    assert [s.attributes["status"] for s in calls] == ["rejected", "rejected", "no_code", "proposed"]
    assert all(s.attributes["prompt_tokens"] == 100 and s.attributes["completion_tokens"] == 200 for s in calls)
    assert "triton.jit" in calls[-1].attributes["completion"] and "# Op `rmsnorm`" in calls[-1].attributes["prompt"]
    assert record.tokens_used == 4 * 300 and record.llm_calls == 4


def test_an_edit_of_the_incumbent_becomes_a_whole_variant(spans):
    with ScriptedLLM([answer(answers.BLOCK_EDIT)]) as server:
        ready, record = run_round(server, spans[0])
    assert len(ready) == 1 and "BLOCK = 1024" in ready[0].source
    assert ready[0].source.replace("BLOCK = 1024", "BLOCK = 512") == BASELINE


def test_hints_and_earlier_outcomes_reach_the_prompt(spans):
    c = campaign(hints=["rows are short: try several rows per program"])
    record = CampaignRecord(campaign_id=c.campaign_id)
    with ScriptedLLM([answer(answers.PROSE), answer(answers.GOOD)]) as server:
        run_round(server, spans[0], record=record, c=c)
    assert "rows are short" in server.user_prompt(0)
    assert "round 0 (model-a): no_code" in server.user_prompt(1)


def test_duplicate_answers_are_refused_and_the_round_stops_at_its_call_limit(spans):
    with ScriptedLLM([answer(answers.GOOD)], repeat_last=True) as server:
        ready, record = run_round(server, spans[0], n=2)
    assert len(ready) == 1
    assert [a.status for a in record.attempts] == ["proposed"] + ["duplicate"] * 5  # 2n + 2 calls
    assert "already tried" in server.user_prompt(2)


def test_the_token_budget_ends_the_round(spans):
    with ScriptedLLM([answer(answers.PROSE)], repeat_last=True) as server:
        ready, record = run_round(server, spans[0], n=4, cfg=config(server.base_url, token_budget=2000))
    assert ready == []
    assert len(server.requests) == 4  # 300 tokens each: after 4 calls under 1024 are left
    assert record.attempts[-1].status == "budget_spent"


def test_prices_parse_per_model_and_bad_ones_are_named():
    assert parse_prices("big:2.5/10, ollama:llama3:0/0") == {"big": Price(2.5, 10.0), "ollama:llama3": Price(0.0, 0.0)}
    for bad in ("big:2.5", "big:x/1", ":1/2", "big:-1/2"):
        with pytest.raises(ValueError, match="KERNELLOOP_LLM_PRICES"):
            parse_prices(bad)


def test_a_cost_budget_needs_a_price_for_every_model(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("KERNELLOOP_LLM_MODELS", "big,small")
    monkeypatch.setenv("KERNELLOOP_LLM_COST_BUDGET_USD", "0.5")
    monkeypatch.setenv("KERNELLOOP_LLM_PRICES", "big:2.5/10")
    with pytest.raises(ValueError, match="no price for small"):
        LLMConfig.from_settings(Settings())
    monkeypatch.setenv("KERNELLOOP_LLM_PRICES", "big:2.5/10,small:0.1/0.4")
    cfg = LLMConfig.from_settings(Settings())
    assert cfg.cost_budget_usd == 0.5 and cfg.price("small") == Price(0.1, 0.4)


def test_the_cost_budget_ends_the_round_and_every_call_says_what_it_cost(spans):
    tracer, exporter = spans
    # 100 prompt + 200 completion tokens at $100/$200 per million: $0.05 a call. A call must be able
    # to hold 1024 tokens at the dearer rate ($0.2048), so $0.36 pays for four calls, not a fifth.
    price = {"model-a": Price(100.0, 200.0)}
    with ScriptedLLM([answer(answers.PROSE)], repeat_last=True) as server:
        ready, record = run_round(server, tracer, n=4,
                                  cfg=config(server.base_url, prices=price, cost_budget_usd=0.36, max_tokens=4000))
    assert ready == []
    assert len(server.requests) == 4
    assert record.cost_usd == pytest.approx(0.2)
    assert record.attempts[-1].status == "budget_spent" and "cost budget of $0.36" in record.attempts[-1].detail
    calls = [s for s in exporter.get_finished_spans() if s.name == "llm.call"]
    assert [s.attributes["cost_usd"] for s in calls] == pytest.approx([0.05] * 4)
    assert calls[-1].attributes["cost_used_usd"] == pytest.approx(0.2)
    # each call may write only what the money left buys: $0.36, 0.31, 0.26, 0.21 at $200 per million
    assert [r["max_tokens"] for r in server.requests] == pytest.approx([1800, 1550, 1300, 1050], abs=1)


def test_rate_limits_past_the_retries_end_as_a_status_and_stop_the_round(spans):
    with ScriptedLLM([error(429)], repeat_last=True) as server:
        ready, record = run_round(server, spans[0], n=1, cfg=config(server.base_url, retries=1))
    assert ready == []
    assert [a.status for a in record.attempts] == ["rate_limited"] * 2
    assert "rate_limited" in server.user_prompt(2)
    assert len(server.requests) == 4  # two calls of two tries each, then the endpoint is left alone


def test_crossover_prompt_shows_both_parents_and_asks_to_combine_them():
    from generator.database import Program
    from generator.prompts import build_messages

    def prog(vid, params):
        source = render(rmsnorm.TEMPLATE, params)
        return Program(variant_id=vid, source=source, strategy="llm", campaign_id="c", round=0,
                       bucket="h1024-r16", status="ok", weighted_speedup=1.3, speedup_ci_low=1.2)

    a, b = prog("aaaa", answers.FAST_PARAMS), prog("bbbb", {**answers.FAST_PARAMS, "BLOCK": 2048})
    prompt = build_messages(PromptContext(rmsnorm, campaign(), 2, "crossover", a, [b]), [])[1]["content"]
    assert "Parent program aaaa: correct, 1.30x" in prompt and "Another good program bbbb" in prompt
    assert "Combine the strengths of the parent aaaa and bbbb" in prompt


def test_the_generator_says_which_strategies_are_active():
    from generator.app import active_strategies

    assert active_strategies(Settings()) == (["params", "crossover"], "LLM off: OPENAI_BASE_URL is not set")
    on = Settings(OPENAI_BASE_URL="http://127.0.0.1:9/v1", KERNELLOOP_LLM_MODELS="m", KERNELLOOP_STRATEGIES="llm")
    assert active_strategies(on) == (["llm"], "")
    with pytest.raises(ValueError, match="unknown strategy genetic"):
        active_strategies(Settings(KERNELLOOP_STRATEGIES="params,genetic"))


def test_the_prompt_gives_the_gpu_s_sms_and_how_far_the_incumbent_is_from_its_measured_peaks():
    from generator.prompts import build_messages
    from shared.schemas import Hardware, ShapeTiming

    gpu = Hardware(key="nvidia-h100-80gb-hbm3", name="NVIDIA H100 80GB HBM3", interpreter=False, torch="2.11",
                   triton="3.6", sm_count=132, memory_gib=79.2, copy_gbps=3000.0, matmul_tflops=780.0)
    c = campaign().model_copy(update={"key": campaign().key.model_copy(update={"hardware": gpu.key})})
    ctx = PromptContext(rmsnorm, c, 1, hardware=gpu,
                        incumbent_timings=[ShapeTiming(shape=[16, 1024], weight=1.0, incumbent_us=2.0, incumbent_spread_us=0.1,
                                                       candidate_us=2.0, candidate_spread_us=0.1, speedup=1.0)])
    prompt = "\n".join(m["content"] for m in build_messages(ctx, []))
    assert "NVIDIA H100 80GB HBM3 (132 SMs, 79.2 GiB, measured copy bandwidth 3,000 GB/s" in prompt
    # rmsnorm of 16x1024 fp32 moves 2 x 64 KiB + the weight: about 135 kB in 2 us = 67 GB/s = 2% of 3000
    assert "GB/s, 2% of measured copy bandwidth" in prompt
    assert "Triton's interpreter" not in prompt
