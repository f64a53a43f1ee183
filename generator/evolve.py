"""Evolution's strategies beside parameter search: LLM mutation (rewrite or edit a parent drawn from
the program database), LLM crossover (combine two good programs), and crossover of template points.

Each is a search.Strategy: it yields candidates in order and stops being asked once the round is
full, so no LLM call is made for a variant the round does not need.
"""
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

from opentelemetry import trace

from generator.database import Attempt, CampaignRecord, ProgramDatabase
from generator.llm import LLMClient, LLMConfig, TokenBudget, parse_answer, trim
from generator.prompts import PromptContext, build_messages
from generator.search import Candidate, Request, _Space
from shared.variants import static_problems, variant_id

log = logging.getLogger("kernelloop.generator")

# Below this many tokens left a call cannot hold a prompt and a kernel: the budget is spent.
MIN_CALL_TOKENS = 1024


# Calls that ended without an answer after all their retries; this many in a row end the round's LLM use.
CALL_FAILURES = ("rate_limited", "server_error", "timeout", "connection_error")
MAX_FAILED_CALLS = 2


def max_calls(n: int) -> int:
    """LLM calls a round may make for n variants: answers without usable code are common."""
    return 2 * n + 2


@dataclass
class LLMStrategy:
    """One chat completion per candidate; what each answer came to goes into record.attempts, so
    the next prompt (this round's or a later one's) says it."""

    client: LLMClient
    context: PromptContext
    record: CampaignRecord
    rng: random.Random
    tracer: trace.Tracer
    models: dict[str, str] = field(default_factory=dict)  # variant id -> the model that wrote it

    @property
    def config(self) -> LLMConfig:
        return self.client.config

    def propose(self, request: Request) -> Iterator[Candidate]:
        budget = TokenBudget(self.config.token_budget, self.record.tokens_used, self.config.cost_budget_usd,
                             self.record.cost_usd)
        seen = set(request.tried)
        if request.campaign.incumbent.variant_id:
            seen.add(request.campaign.incumbent.variant_id)
        parents = [p.variant_id for p in [self.context.parent, *self.context.inspirations[:1]] if p is not None]
        if self.context.task != "crossover":
            parents = parents[:1]
        failed_in_a_row = 0
        for _ in range(max_calls(request.n)):
            model = self.config.pick(self.rng)
            if budget.left_for(self.config.price(model)) < MIN_CALL_TOKENS:
                self._attempt(request.round, "-", "budget_spent", budget.spent(self.config.price(model)))
                return
            source, status = self._one_call(request, model, budget, seen)
            if status == "error":
                return  # a 4xx other than 429 (bad model name, bad key): more calls fail the same way
            failed_in_a_row = failed_in_a_row + 1 if status in CALL_FAILURES else 0
            if failed_in_a_row == MAX_FAILED_CALLS:
                return  # the endpoint is down or saturated: let another strategy have the round
            if source is not None:
                vid = variant_id(source, {})
                seen.add(vid)
                self.models[vid] = model
                yield Candidate(params={}, source=source, strategy="llm", parents=parents)

    def _one_call(self, request: Request, model: str, budget: TokenBudget,
                  seen: set[str]) -> tuple[str | None, str]:
        messages = build_messages(self.context, self.record.attempts)
        prompt_text = "\n\n".join(m["content"] for m in messages)
        with self.tracer.start_as_current_span("llm.call") as span:
            span.set_attributes({"campaign_id": request.campaign.campaign_id, "round": request.round,
                                 "model": model, "task": self.context.task, "prompt": trim(prompt_text),
                                 "prompt_chars": len(prompt_text)})
            price = self.config.price(model)
            completion = self.client.complete(messages, model, min(self.config.max_tokens, budget.left_for(price)))
            cost = budget.charge(completion, price)
            self.record.tokens_used, self.record.cost_usd = budget.used, budget.cost_usd
            self.record.llm_calls += 1
            span.set_attributes({"completion": trim(completion.text), "prompt_tokens": completion.prompt_tokens,
                                 "completion_tokens": completion.completion_tokens, "attempts": completion.attempts,
                                 "tokens_used": budget.used, "tokens_left": budget.left, "cost_usd": cost,
                                 "cost_used_usd": budget.cost_usd, "call_status": completion.status})
            source, vid = None, None
            if completion.status != "ok":
                status, detail = completion.status, completion.error or ""
            else:
                parsed = parse_answer(completion.text, self.context.parent_source)
                span.set_attribute("answer_kind", parsed.kind)
                if parsed.source is None:
                    status, detail = "no_code", parsed.problem or ""
                elif problems := static_problems(parsed.source):
                    status, detail = "rejected", "; ".join(problems)
                elif (vid := variant_id(parsed.source, {})) in seen:
                    status, detail = "duplicate", f"program {vid} was already tried; write a different one"
                else:
                    status, detail, source = "proposed", "", parsed.source
            span.set_attribute("status", status)
            if detail:
                span.set_attribute("detail", trim(detail, 1000))
            if vid:
                span.set_attribute("variant_id", vid)
        self._attempt(request.round, model, status, detail, vid if status == "proposed" else None)
        log.info("campaign %s round %d: %s answered: %s %s", request.campaign.campaign_id, request.round, model,
                 status, trim(detail, 200))
        return source, status

    def _attempt(self, round: int, model: str, status: str, detail: str, vid: str | None = None) -> None:
        self.record.attempts.append(Attempt(round=round, model=model, status=status, detail=detail, variant_id=vid))


class ParamCrossover:
    """Children of two of the best template points, each dimension from one parent or the other."""

    def propose(self, request: Request) -> Iterator[Candidate]:
        space = _Space(request)
        parents = []
        for scored in request.best:
            point = space.point_of(scored.params)
            if point is not None and all(point != p for p, _ in parents):
                parents.append((point, scored.variant_id))
        for (a, va), (b, vb) in itertools.combinations(parents[:3], 2):
            children = [tuple(pick) for pick in itertools.product(*zip(a, b))]
            request.rng.shuffle(children)
            for child in children:
                if child not in (a, b) and space.allowed(child):
                    yield space.candidate(child, "evolve", [va, vb])


def has_template(op: ModuleType) -> bool:
    return bool(getattr(op, "TEMPLATE", None)) and bool(getattr(op, "SPACE", None))


def crossover_parents(op: ModuleType, best: list, db: ProgramDatabase, bucket: str) -> str | None:
    """Which crossover can run: "params" with two template points among the best, "llm" with two
    scored programs in the database, else None."""
    if has_template(op) and len({tuple(sorted(s.params.items())) for s in best if s.params}) >= 2:
        return "params"
    if len(db.scored(bucket)) >= 2:
        return "llm"
    return None
