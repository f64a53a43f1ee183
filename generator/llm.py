"""The LLM through any OpenAI-compatible endpoint: an ensemble of weighted models, one chat
completion per call with a timeout, retries with exponential back-off on rate limits, server
errors and timeouts, a token and a money budget per campaign, and code parsed out of the answer (a
whole file, or SEARCH/REPLACE edits against the parent).

Every call is one `llm.call` span on the campaign's trace with the (trimmed) prompt and completion,
the token counts, what it cost, the model and how the call ended.
"""
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import openai
from opentelemetry import trace

from shared.settings import Settings

log = logging.getLogger("kernelloop.generator")

# What a span keeps of a prompt or completion: enough to read what was asked and said.
TRACE_CHARS = 4000
# The longest wait between retries, whatever the server's Retry-After says.
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class ModelChoice:
    name: str
    weight: float


@dataclass(frozen=True)
class Price:
    """What a model's tokens cost, in USD per million (the unit every provider's price list uses)."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


def parse_prices(spec: str) -> dict[str, Price]:
    """"model-a:2.5/10,model-b:0.15/0.6" -> USD per million prompt/completion tokens per model."""
    prices = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, pair = item.rpartition(":")
        prompt, slash, completion = pair.partition("/")
        if not sep or not name or not slash or not _is_number(prompt) or not _is_number(completion):
            raise ValueError(f"KERNELLOOP_LLM_PRICES: {item!r} is not MODEL:PROMPT/COMPLETION "
                             "(USD per million tokens, e.g. my-model:2.5/10)")
        if float(prompt) < 0 or float(completion) < 0:
            raise ValueError(f"KERNELLOOP_LLM_PRICES: prices of {name!r} must not be negative")
        prices[name] = Price(float(prompt), float(completion))
    return prices


def parse_models(spec: str) -> list[ModelChoice]:
    """"model-a:0.7,model-b:0.3" -> weighted models; a model without a weight weighs 1."""
    models = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep or not _is_number(weight):
            name, weight = item, "1"  # names may contain colons (ollama tags): only a number is a weight
        if float(weight) <= 0:
            raise ValueError(f"KERNELLOOP_LLM_MODELS: weight of {name!r} must be positive, got {weight}")
        models.append(ModelChoice(name, float(weight)))
    return models


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    api_key: str
    models: list[ModelChoice]
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 2.0
    max_tokens: int = 4096
    token_budget: int = 200_000
    prices: dict[str, Price] = field(default_factory=dict)  # unpriced models (local servers) cost nothing
    cost_budget_usd: float | None = None  # per campaign; None: only the token budget limits

    @classmethod
    def from_settings(cls, settings: Settings) -> "LLMConfig | None":
        """None when no endpoint is configured: the generator then runs its search strategies alone."""
        if not settings.openai_base_url:
            return None
        models = parse_models(settings.llm_models)
        if not models:
            raise ValueError("OPENAI_BASE_URL is set but KERNELLOOP_LLM_MODELS names no model "
                             "(e.g. KERNELLOOP_LLM_MODELS=my-model or model-a:0.7,model-b:0.3)")
        prices = parse_prices(settings.llm_prices)
        unpriced = [m.name for m in models if m.name not in prices]
        if settings.llm_cost_budget_usd is not None and unpriced:
            # a money budget over models of unknown price would limit nothing: say so rather than guess
            raise ValueError(f"KERNELLOOP_LLM_COST_BUDGET_USD is set but KERNELLOOP_LLM_PRICES gives no price "
                             f"for {', '.join(unpriced)} (e.g. {unpriced[0]}:2.5/10, USD per million tokens)")
        # local servers (vLLM, Ollama) take any key; the client insists on one
        return cls(base_url=settings.openai_base_url, api_key=settings.openai_api_key or "none", models=models,
                   timeout_s=settings.llm_timeout_s, retries=settings.llm_retries, backoff_s=settings.llm_backoff_s,
                   max_tokens=settings.llm_max_tokens, token_budget=settings.llm_token_budget, prices=prices,
                   cost_budget_usd=settings.llm_cost_budget_usd)

    def price(self, model: str) -> Price:
        return self.prices.get(model, Price())

    def pick(self, rng: random.Random) -> str:
        return rng.choices([m.name for m in self.models], weights=[m.weight for m in self.models])[0]


CallStatus = str  # ok, rate_limited, server_error, timeout, connection_error, error


@dataclass
class Completion:
    model: str
    status: CallStatus
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error: str | None = None
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenBudget:
    """Tokens and money a campaign may still spend; shared by every LLM call of the campaign."""

    limit: int
    used: int = 0
    cost_limit_usd: float | None = None
    cost_usd: float = 0.0

    @property
    def left(self) -> int:
        return max(self.limit - self.used, 0)

    def left_for(self, price: Price) -> int:
        """Tokens one call to a model of this price may still use: the token budget's rest, and no
        more than the money left buys at the model's dearer rate (so one call cannot overspend)."""
        left = self.left
        rate = max(price.prompt, price.completion)
        if self.cost_limit_usd is not None and rate > 0:
            left = min(left, int(max(self.cost_limit_usd - self.cost_usd, 0.0) / rate * 1e6))
        return left

    def charge(self, completion: "Completion", price: Price) -> float:
        cost = price.cost(completion.prompt_tokens, completion.completion_tokens)
        self.used += completion.tokens
        self.cost_usd += cost
        return cost

    def spent(self, price: Price) -> str:
        """Why no call to a model of this price fits any more, for the attempt's record."""
        if self.left_for(price) < self.left:  # the money, not the tokens, ran out first
            return f"cost budget of ${self.cost_limit_usd:g} spent (${self.cost_usd:.4f} used, {self.used} tokens)"
        return f"token budget of {self.limit} spent ({self.used} used, ${self.cost_usd:.4f})"


class LLMClient:
    """One chat completion at a time through the `openai` client, with our own retry loop so each
    attempt and its wait land on the trace."""

    def __init__(self, config: LLMConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.sleep = sleep
        self.client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key, timeout=config.timeout_s,
                                    max_retries=0)

    def complete(self, messages: list[dict], model: str, max_tokens: int) -> Completion:
        span = trace.get_current_span()
        result = Completion(model=model, status="error")
        for attempt in range(self.config.retries + 1):
            result.attempts = attempt + 1
            wait = None
            try:
                response = self.client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
            except openai.RateLimitError as e:
                result.status, result.error, wait = "rate_limited", _short(e), _retry_after(e)
            except openai.InternalServerError as e:
                result.status, result.error, wait = "server_error", _short(e), _retry_after(e)
            except openai.APITimeoutError as e:
                result.status, result.error = "timeout", f"no answer within {self.config.timeout_s:g} s"
            except openai.APIConnectionError as e:
                result.status, result.error = "connection_error", _short(e)
            except openai.APIStatusError as e:  # 4xx other than 429: asking again will not help
                result.status, result.error = "error", _short(e)
                return result
            else:
                choice = response.choices[0] if response.choices else None
                usage = response.usage
                result.status, result.error = "ok", None
                result.text = (choice.message.content or "") if choice else ""
                result.finish_reason = choice.finish_reason if choice else None
                result.prompt_tokens = usage.prompt_tokens if usage else 0
                result.completion_tokens = usage.completion_tokens if usage else 0
                return result
            if attempt == self.config.retries:
                break
            delay = min(wait if wait is not None else self.config.backoff_s * 2 ** attempt, MAX_BACKOFF_S)
            span.add_event("llm.retry", {"model": model, "attempt": attempt + 1, "status": result.status,
                                         "wait_s": delay})
            log.warning("LLM %s: %s (attempt %d); retrying in %.1f s", model, result.status, attempt + 1, delay)
            self.sleep(delay)
        return result


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def _retry_after(e: openai.APIStatusError) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


# ---- code out of an answer -------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_EDIT = re.compile(r"<{5,9} SEARCH[^\n]*\n(.*?)\n?={5,9}\n(.*?)\n?>{5,9} REPLACE", re.DOTALL)


@dataclass
class Parsed:
    source: str | None
    kind: str  # rewrite, diff or none
    problem: str | None = None
    edits: int = field(default=0)


def parse_answer(text: str, parent_source: str | None) -> Parsed:
    """The program an answer proposes: SEARCH/REPLACE edits applied to the parent, or the fenced
    Python block that defines launch() (the last such block: models revise as they write)."""
    edits = _EDIT.findall(text)
    if edits:
        if not parent_source:
            return Parsed(None, "diff", "SEARCH/REPLACE edits need a parent program; none was given, "
                                        "so answer with the whole file")
        source = parent_source
        for i, (search, replace) in enumerate(edits, 1):
            if search not in source:
                return Parsed(None, "diff", f"edit {i}: its SEARCH text is not in the parent program "
                                            "(copy it exactly, whitespace included)", len(edits))
            source = source.replace(search, replace, 1)
        return Parsed(source, "diff", None, len(edits))
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    with_launch = [b for b in blocks if re.search(r"^def launch\(", b, re.MULTILINE)]
    if with_launch:
        return Parsed(with_launch[-1].strip() + "\n", "rewrite")
    if blocks:
        return Parsed(max(blocks, key=len).strip() + "\n", "rewrite")  # the static check names what is missing
    return Parsed(None, "none", "the answer had no ```python code block; answer with the whole file in one block")


def trim(text: str, limit: int = TRACE_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - limit} characters left out] ...\n{text[-half:]}"
