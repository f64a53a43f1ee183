"""The program database: every program the generator proposed, with its benchmark outcome, kept in
islands and a MAP-Elites archive, and persisted in JetStream KV so a campaign survives a generator
restart and a later campaign of the same hardware, op and dtype starts from its best programs.

Islands evolve apart (a round draws its parent from one island, in turn) so one early winner does
not collapse the search; every MIGRATE_EVERY rounds each island's best joins the next island.

The archive keeps the best program per cell of two features:
- `shape`: the profile shape on which the program gains most relative to its own mean. Profiles
  shift and buckets split; keeping a specialist per shape keeps a starting point for each.
- `size`: the program's AST size on a log scale. Elaborate kernels (split reductions, several
  launches) often lose at first and win after refinement; without their own cells the simple
  programs would crowd them out.
Fitness is the lower bound of the speedup's confidence interval: noise must not make an elite.
"""
import ast
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import Field

from shared import subjects
from shared.broker import replicas
from shared.schemas import BenchResult, Failure, Hardware, KernelKey, Model, Scored, ShapeTiming

N_ISLANDS = 3
MIGRATE_EVERY = 2
EXPLOIT = 0.7  # chance a round's parent is its island's best rather than an archive elite
KEEP_ATTEMPTS = 24  # per campaign, for the next prompt
CAS_TRIES = 16


class Program(Model):
    variant_id: str
    source: str
    params: dict = Field(default_factory=dict)
    strategy: str
    parents: list[str] = Field(default_factory=list)
    campaign_id: str
    round: int
    bucket: str
    islands: list[int] = Field(default_factory=list)
    model: str | None = None  # the LLM that wrote it
    status: str = "pending"  # pending until its bench.result arrives, then that result's status
    error: str | None = None
    weighted_speedup: float | None = None
    speedup_ci_low: float | None = None
    timings: list[ShapeTiming] = Field(default_factory=list)
    hardware_name: str | None = None
    hardware: Hardware | None = None  # where the timings were measured: SMs and measured peaks for prompts

    @property
    def fitness(self) -> float | None:
        return self.speedup_ci_low if self.status == "ok" else None


class Attempt(Model):
    """One LLM answer and what became of it; the next prompt lists these."""

    round: int
    model: str
    status: str  # no_code, rejected, duplicate, proposed, or an LLM call failure
    detail: str = ""
    variant_id: str | None = None


class RoundRecord(Model):
    arm: str
    variant_ids: list[str]
    best_before: float  # best ci_low of the campaign before this round, for the bandit's reward
    rewarded: bool = False


class CampaignRecord(Model):
    """The generator's own state of one campaign."""

    campaign_id: str
    tokens_used: int = 0
    cost_usd: float = 0.0  # at KERNELLOOP_LLM_PRICES; 0 for unpriced models
    llm_calls: int = 0
    attempts: list[Attempt] = Field(default_factory=list)
    rounds: dict[int, RoundRecord] = Field(default_factory=dict)


def features(program: Program) -> tuple[int, int] | None:
    """The archive cell (shape, size) of a scored program; None while it has no timings."""
    if program.status != "ok" or not program.timings:
        return None
    mean = sum(t.speedup * t.weight for t in program.timings) / sum(t.weight for t in program.timings)
    shape = max(range(len(program.timings)), key=lambda i: program.timings[i].speedup / mean)
    try:
        nodes = sum(1 for _ in ast.walk(ast.parse(program.source)))
    except SyntaxError:
        return None
    return shape, max(nodes.bit_length() - 7, 0)  # 128 nodes and fewer share a cell; then one per doubling


@dataclass
class Selection:
    parent: Program | None
    inspirations: list[Program]
    island: int


class ProgramDatabase:
    """Programs of one family (hardware, op, dtype), in memory; pure, so tests need no broker."""

    def __init__(self, programs: list[Program] | None = None):
        self.programs: dict[str, Program] = {p.variant_id: p for p in programs or []}

    def add(self, program: Program) -> None:
        old = self.programs.get(program.variant_id)
        if old is not None and old.status != "pending":  # a re-proposal never forgets a verdict
            program = program.model_copy(update={k: getattr(old, k) for k in
                                                 ("status", "error", "weighted_speedup", "speedup_ci_low",
                                                  "timings", "hardware_name", "hardware", "islands")})
        self.programs[program.variant_id] = program

    def record(self, result: BenchResult) -> Program | None:
        program = self.programs.get(result.variant_id)
        if program is None:
            return None
        program.status, program.error = result.status, result.error
        program.weighted_speedup, program.speedup_ci_low = result.weighted_speedup, result.speedup_ci_low
        program.timings, program.hardware_name = list(result.timings), result.hardware.name
        program.hardware = result.hardware
        return program

    def learn(self, failures: list[Failure], best: list[Scored]) -> None:
        """Verdicts the deployer passed on (a refine's failures and best) for programs still pending."""
        for f in failures:
            p = self.programs.get(f.variant_id)
            if p is not None and p.status == "pending":
                p.status, p.error = f.status, f.error
        for b in best:
            p = self.programs.get(b.variant_id)
            if p is not None and p.status == "pending":
                p.status, p.weighted_speedup, p.speedup_ci_low = "ok", b.weighted_speedup, b.speedup_ci_low

    def scored(self, bucket: str | None = None) -> list[Program]:
        """Correct programs, best first; those of the given bucket ahead of the family's others."""
        ok = [p for p in self.programs.values() if p.fitness is not None]
        return sorted(ok, key=lambda p: (bucket is not None and p.bucket == bucket, p.fitness), reverse=True)

    def island(self, i: int) -> list[Program]:
        return [p for p in self.scored() if i in p.islands]

    def archive(self) -> dict[tuple[int, int], Program]:
        cells: dict[tuple[int, int], Program] = {}
        for program in self.scored():  # best first, so the first program into a cell is its elite
            cell = features(program)
            if cell is not None and cell not in cells:
                cells[cell] = program
        return cells

    def migrate(self, round: int) -> list[tuple[str, int]]:
        """On every MIGRATE_EVERY-th round each island's best also joins the next island."""
        if round == 0 or round % MIGRATE_EVERY:
            return []
        leaders = [(i, members[0]) for i in range(N_ISLANDS) if (members := self.island(i))]  # before any moves
        moved = []
        for i, leader in leaders:
            target = (i + 1) % N_ISLANDS
            if target not in leader.islands:
                leader.islands.append(target)
                moved.append((leader.variant_id, target))
        return moved

    def select(self, round: int, bucket: str, rng: random.Random, k: int = 2) -> Selection:
        """A parent from this round's island (its best, or now and then an archive elite) and up to
        k inspirations from the other islands and the archive."""
        island = round % N_ISLANDS
        members = [p for p in self.island(island) if p.bucket == bucket] or self.island(island)
        elites = list(self.archive().values())
        scored = self.scored(bucket)
        if members and rng.random() < EXPLOIT:
            parent = members[0]
        elif elites:
            parent = rng.choice(elites)
        else:
            parent = scored[0] if scored else None
        others = [p for p in elites + scored if parent is None or p.variant_id != parent.variant_id]
        inspirations = list({p.variant_id: p for p in others}.values())[:k]
        return Selection(parent, inspirations, island)

    def island_for(self, parents: list[str], round: int) -> list[int]:
        for vid in parents:
            if vid in self.programs and self.programs[vid].islands:
                return [self.programs[vid].islands[0]]
        return [round % N_ISLANDS]


# ---- persistence ---------------------------------------------------------------------------------

_KEY_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")


def campaign_key(campaign_id: str) -> str:
    return f"camp.{_token(campaign_id)}"


def family(key: KernelKey) -> str:
    return f"{key.hardware}.{key.op}.{key.dtype}"


def _token(text: str) -> str:
    """A KV key token for free text (hand-named campaigns may hold any character)."""
    return text if _KEY_TOKEN.match(text) and len(text) <= 64 else hashlib.sha256(text.encode()).hexdigest()[:32]


class ProgramStore:
    """The database in a JetStream KV bucket: one key per program (`prog.<family>.<variant>`), one
    per campaign (`camp.<campaign>`), one per op for the bandit (`bandit.<op>`)."""

    def __init__(self, kv: KeyValue):
        self.kv = kv

    @classmethod
    async def open(cls, broker) -> "ProgramStore":
        return cls(await broker.key_value(subjects.PROGRAM_BUCKET, history=subjects.PROGRAM_HISTORY,
                                           replicas=replicas()))

    async def load(self, key: KernelKey) -> ProgramDatabase:
        programs = []
        watcher = await self.kv.watch(f"prog.{family(key)}.>", ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:  # the end of the current values
                    break
                if entry.value:
                    programs.append(Program.model_validate_json(entry.value))
        finally:
            await watcher.stop()
        return ProgramDatabase(programs)

    async def save(self, key: KernelKey, programs: list[Program]) -> None:
        for p in programs:
            await self.kv.put(f"prog.{family(key)}.{p.variant_id}", p.model_dump_json().encode())

    async def record(self, result: BenchResult) -> Program | None:
        """Store a benchmark's verdict on the program it judged; None for a program we never proposed."""
        k = f"prog.{family(result.campaign.key)}.{result.variant_id}"
        value = await self._get(k)
        if value is None:
            return None
        db = ProgramDatabase([Program.model_validate_json(value)])
        program = db.record(result)
        await self.kv.put(k, program.model_dump_json().encode())
        return program

    async def campaign(self, campaign_id: str) -> CampaignRecord:
        value = await self._get(campaign_key(campaign_id))
        if value is None:
            return CampaignRecord(campaign_id=campaign_id)
        return CampaignRecord.model_validate_json(value)

    async def update_campaign(self, campaign_id: str,
                              change: Callable[[CampaignRecord], None]) -> CampaignRecord:
        """Apply change to the stored record with compare-and-set: the round handler and the
        result handler both write it."""
        def apply(data: dict | None) -> dict:
            record = CampaignRecord(campaign_id=campaign_id) if data is None else CampaignRecord.model_validate(data)
            change(record)
            record.attempts = record.attempts[-KEEP_ATTEMPTS:]
            return record.model_dump(mode="json")

        return CampaignRecord.model_validate(await self.update_json(campaign_key(campaign_id), apply))

    async def get_json(self, key: str) -> dict | None:
        value = await self._get(key)
        return None if value is None else json.loads(value)

    async def update_json(self, key: str, change: Callable[[dict | None], dict]) -> dict:
        for _ in range(CAS_TRIES):
            try:
                entry = await self.kv.get(key)
                revision, data = entry.revision, json.loads(entry.value) if entry.value else None
            except nats.js.errors.KeyNotFoundError:
                revision, data = None, None
            new = change(data)
            try:
                if revision:
                    await self.kv.update(key, json.dumps(new).encode(), last=revision)
                else:
                    await self.kv.create(key, json.dumps(new).encode())
                return new
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
                continue  # another writer got there first: read again
        raise RuntimeError(f"{key}: still contended after {CAS_TRIES} compare-and-set tries")

    async def _get(self, key: str) -> bytes | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value if entry.value else None
