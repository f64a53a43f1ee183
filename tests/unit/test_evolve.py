"""The program database (islands, migration, MAP-Elites archive, parent selection) and crossover of
template points: pure logic, no broker."""
import random

from generator.database import N_ISLANDS, Program, ProgramDatabase, features
from generator.evolve import ParamCrossover, crossover_parents
from generator.search import propose_round
from shared.hardware import fingerprint
from shared.ops import rmsnorm
from shared.schemas import BenchResult, Campaign, Failure, KernelKey, Scored, ShapeTiming, WeightedShape
from shared.variants import render, variant_id

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
CAMPAIGN = Campaign(campaign_id="evo", key=KEY, profile=[WeightedShape(shape=[16, 1024], weight=3.0),
                                                         WeightedShape(shape=[256, 1024], weight=1.0)])


def program(vid, low=None, island=0, speedups=(1.0, 1.0), source=None, bucket="h1024-r16", status=None):
    timings = [ShapeTiming(shape=ws.shape, weight=ws.weight, candidate_us=10 / s, candidate_spread_us=0.1,
                           incumbent_us=10, incumbent_spread_us=0.1, speedup=s)
               for ws, s in zip(CAMPAIGN.profile, speedups)] if low is not None else []
    return Program(variant_id=vid, source=source or render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT), strategy="llm",
                   campaign_id="evo", round=0, bucket=bucket, islands=[island],
                   status=status or ("ok" if low is not None else "pending"),
                   weighted_speedup=None if low is None else low + 0.05, speedup_ci_low=low, timings=timings)


def test_a_verdict_lands_on_its_program_and_a_re_proposal_keeps_it():
    db = ProgramDatabase([program("a")])
    result = BenchResult(campaign=CAMPAIGN, variant_id="a", source="", strategy="llm", round=0, round_size=1,
                         status="incorrect", error="shape [5, 2049]: error 0.3", hardware=fingerprint())
    assert db.record(result).status == "incorrect"
    db.add(program("a"))
    assert db.programs["a"].status == "incorrect" and "2049" in db.programs["a"].error
    assert db.record(result.model_copy(update={"variant_id": "unknown"})) is None


def test_refine_verdicts_fill_programs_still_pending():
    db = ProgramDatabase([program("a"), program("b")])
    db.learn([Failure(variant_id="a", status="timeout", error="no result")],
             [Scored(variant_id="b", weighted_speedup=1.3, speedup_ci_low=1.2)])
    assert db.programs["a"].status == "timeout"
    assert db.programs["b"].fitness == 1.2


def test_archive_keeps_a_specialist_per_shape_and_the_best_per_cell():
    small = program("small", 1.3, speedups=(1.6, 0.9))
    big = program("big", 1.1, speedups=(1.0, 1.5))
    worse_small = program("worse", 1.2, speedups=(1.5, 0.9))
    db = ProgramDatabase([small, big, worse_small, program("failed", status="incorrect")])
    cells = db.archive()
    assert features(small)[0] == 0 and features(big)[0] == 1
    assert {p.variant_id for p in cells.values()} == {"small", "big"}


def test_islands_evolve_apart_and_migrate_their_best():
    db = ProgramDatabase([program("i0", 1.4, island=0), program("i1", 1.1, island=1)])
    assert db.select(1, "h1024-r16", random.Random(0)).island == 1
    assert db.migrate(1) == []  # only every MIGRATE_EVERY-th round
    moved = db.migrate(2)
    assert ("i0", 1) in moved and ("i1", 2) in moved
    assert db.island(1)[0].variant_id == "i0"  # the stronger migrant now leads island 1


def test_parent_is_the_islands_best_and_inspirations_come_from_elsewhere():
    db = ProgramDatabase([program("a", 1.4, island=0), program("b", 1.2, island=1),
                          program("c", 1.3, island=0, bucket="h4096-r16")])
    picks = [db.select(0, "h1024-r16", random.Random(seed)) for seed in range(20)]
    assert sum(s.parent.variant_id == "a" for s in picks) >= 12  # exploitation, mostly
    assert all(s.parent.variant_id not in {p.variant_id for p in s.inspirations} for s in picks)
    assert ProgramDatabase().select(0, "h1024-r16", random.Random(0)).parent is None


def test_new_programs_join_their_parents_island():
    db = ProgramDatabase([program("a", 1.4, island=2)])
    assert db.island_for(["a"], 0) == [2]
    assert db.island_for([], 4) == [4 % N_ISLANDS]


def test_param_crossover_mixes_two_of_the_best_points():
    a = {"BLOCK": 1024, "ROWS": 1, "num_warps": 4}
    b = {"BLOCK": 2048, "ROWS": 4, "num_warps": 8}
    best = [Scored(variant_id="va", params=a, weighted_speedup=1.3, speedup_ci_low=1.2),
            Scored(variant_id="vb", params=b, weighted_speedup=1.2, speedup_ci_low=1.1)]
    assert crossover_parents(rmsnorm, best, ProgramDatabase(), "h1024-r16") == "params"
    ready = propose_round(rmsnorm, CAMPAIGN, 1, 4, set(), best, strategy=ParamCrossover())
    assert len(ready) == 4
    for v in ready:
        assert v.strategy == "evolve" and v.parents == ["va", "vb"]
        assert all(v.params[k] in (a[k], b[k]) for k in a) and v.params not in (a, b)
        assert v.variant_id == variant_id(render(rmsnorm.TEMPLATE, v.params), v.params)
