"""Parameter search: coverage in round 0, local steps later, determinism, exclusions, pruning,
static checks, and variants that really run."""
import logging
from types import SimpleNamespace

import torch

from generator.search import propose_round
from shared import variants
from shared.ops import get_op
from shared.schemas import Campaign, Incumbent, KernelKey, Scored, WeightedShape

OP = get_op("rmsnorm")


def campaign(campaign_id="c0ffee", incumbent=None, hidden=4096):
    return Campaign(
        campaign_id=campaign_id,
        key=KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket=f"h{hidden}-r16"),
        profile=[WeightedShape(shape=[16, hidden], weight=1.0)],
        incumbent=incumbent or Incumbent(),
    )


def scored(variant):
    return Scored(variant_id=variant.variant_id, params=variant.params, weighted_speedup=1.3, speedup_ci_low=1.2)


def one_step_apart(a: dict, b: dict) -> bool:
    steps = [abs(OP.SPACE[k].index(a[k]) - OP.SPACE[k].index(b[k])) for k in OP.SPACE]
    return sum(steps) == 1


def test_round_zero_gives_n_distinct_variants_whose_ids_hash_their_source():
    ready = propose_round(OP, campaign(), 0, 8, set(), [])
    assert len(ready) == 8
    assert len({v.variant_id for v in ready}) == 8
    for v in ready:
        assert v.source == variants.render(OP.TEMPLATE, v.params)
        assert v.variant_id == variants.variant_id(v.source, v.params)
        assert (v.strategy, v.round, v.round_size, v.parents) == ("grid", 0, 8, [])
        assert v.event_id == f"variant-c0ffee-0-{v.variant_id}"


def test_round_zero_covers_every_value_of_every_dimension():
    ready = propose_round(OP, campaign(), 0, 8, set(), [])
    for name, values in OP.SPACE.items():
        assert {v.params[name] for v in ready} == set(values), name


def test_round_zero_never_proposes_the_default_when_the_fallback_serves():
    ready = propose_round(OP, campaign(), 0, 256, set(), [])
    size = len(OP.SPACE["BLOCK"]) * len(OP.SPACE["ROWS"]) * len(OP.SPACE["num_warps"])
    assert len(ready) == size - 1
    assert all(v.params != OP.DEFAULT for v in ready)


def test_round_zero_skips_a_deployed_incumbent_but_may_try_the_default():
    deployed = {"BLOCK": 4096, "ROWS": 2, "num_warps": 8}
    source = variants.render(OP.TEMPLATE, deployed)
    incumbent = Incumbent(variant_id=variants.variant_id(source, deployed), source=source, params=deployed)
    ready = propose_round(OP, campaign(incumbent=incumbent), 0, 256, set(), [])
    assert all(v.params != deployed for v in ready)
    assert any(v.params == OP.DEFAULT for v in ready)


def test_same_campaign_proposes_the_same_variants_and_event_ids():
    first = propose_round(OP, campaign("same"), 0, 8, set(), [])
    again = propose_round(OP, campaign("same"), 0, 8, set(), [])
    assert [v.event_id for v in first] == [v.event_id for v in again]
    other = propose_round(OP, campaign("other"), 0, 8, set(), [])
    assert {v.variant_id for v in other} != {v.variant_id for v in first}


def test_refine_round_steps_from_the_best_and_skips_what_was_tried():
    round0 = propose_round(OP, campaign(), 0, 8, set(), [])
    tried = {v.variant_id for v in round0}
    best = round0[3]
    ready = propose_round(OP, campaign(), 1, 8, tried, [scored(best)])
    assert len(ready) == 8
    assert not tried & {v.variant_id for v in ready}
    local = [v for v in ready if v.parents]
    assert len(local) >= 4
    for v in local:
        assert v.parents == [best.variant_id]
        assert one_step_apart(v.params, best.params)
    assert all(v.strategy == "local" and v.round == 1 and v.round_size == 8 for v in ready)
    assert all(v.event_id == f"variant-c0ffee-1-{v.variant_id}" for v in ready)


def test_exhausted_space_returns_nothing():
    everything = propose_round(OP, campaign(), 0, 256, set(), [])
    best = [scored(everything[0])]
    assert propose_round(OP, campaign(), 1, 8, {v.variant_id for v in everything}, best) == []


def test_op_prune_hook_removes_points_in_every_round():
    def prune(params, profile):
        # at most one BLOCK above the next power of two of the largest hidden size
        hidden = max(s.shape[-1] for s in profile)
        return params["BLOCK"] > 2 * (1 << (hidden - 1).bit_length())

    op = SimpleNamespace(SPACE=OP.SPACE, DEFAULT=OP.DEFAULT, TEMPLATE=OP.TEMPLATE, prune=prune)
    c = campaign(hidden=300)  # next_pow2 = 512: BLOCK 256, 512 and 1024 stay
    round0 = propose_round(op, c, 0, 256, set(), [])
    assert {v.params["BLOCK"] for v in round0} == {256, 512, 1024}
    edge = next(v for v in round0 if v.params["BLOCK"] == 1024)
    # BLOCK 2048 is the only untried neighbour of the edge, and the hook refuses it
    assert propose_round(op, c, 1, 8, {v.variant_id for v in round0}, [scored(edge)]) == []


def test_round_zero_starts_with_the_seeds_the_prune_keeps_then_spreads():
    first, second, pruned = ({"BLOCK": 2048, "ROWS": 4, "num_warps": 8}, {"BLOCK": 8192, "ROWS": 1, "num_warps": 16},
                             {"BLOCK": 1024, "ROWS": 2, "num_warps": 4})
    op = SimpleNamespace(SPACE=OP.SPACE, DEFAULT=OP.DEFAULT, TEMPLATE=OP.TEMPLATE, SEEDS=[first, pruned, second],
                         prune=lambda params, profile: params == pruned)
    ready = propose_round(op, campaign(), 0, 8, set(), [])
    assert [v.params for v in ready[:2]] == [first, second]
    assert all(v.params != pruned for v in ready) and len(ready) == 8
    # at most half a round comes from the seeds: coverage still gets the rest
    assert [v.params for v in propose_round(op, campaign(), 0, 2, set(), [])][:1] == [first]
    assert propose_round(op, campaign(), 0, 2, set(), [])[1].params != second


def test_sources_failing_static_checks_are_dropped_and_replaced(caplog):
    # "_PAD-1 = 0" is a syntax error: every SHIFT=-1 point must be refused before it leaves
    space = {**OP.SPACE, "SHIFT": [0, -1]}
    op = SimpleNamespace(SPACE=space, DEFAULT={**OP.DEFAULT, "SHIFT": 0}, TEMPLATE=OP.TEMPLATE + "_PAD$SHIFT = 0\n")
    with caplog.at_level(logging.WARNING, logger="kernelloop.generator"):
        ready = propose_round(op, campaign(), 0, 8, set(), [])
    assert len(ready) == 8
    assert all(v.params["SHIFT"] == 0 for v in ready)
    assert all(not variants.static_problems(v.source) for v in ready)
    assert "syntax error" in caplog.text


def test_proposed_variants_compile_and_match_the_reference(tmp_path):
    x, weight = OP.make_inputs([3, 1000], torch.float32, "cpu", seed=1)
    expected = OP.reference(x, weight)
    for v in propose_round(OP, campaign(), 0, 3, set(), []):
        assert not variants.static_problems(v.source)
        launch = variants.load(v.source, v.params, v.variant_id, tmp_path)
        got = launch(x, weight)
        err = (got - expected).norm() / expected.norm()
        assert err < OP.TOLERANCE["float32"], v.params
