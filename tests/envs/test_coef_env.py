"""The coefficient env: API checks, the neutral action is the calibrated DP, every budget of a
range is met, the budget is in the observation; the orchestrator on it."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from synth import SHAPES, synth_config, synth_tables

from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.database.allocate import allocate_dp, plan_avg_bits, plan_error
from automl_compress.envs.coef_env import NEUTRAL, Anchors, CoefficientEnv, Incumbent, gap_weights
from automl_compress.errors import InfeasibleBudgetError
from automl_compress.search import Evaluator

RANGE = (2.5, 2.75, 3.0, 3.25, 3.5)


@pytest.fixture(scope="module")
def tables():
    return synth_tables(0)


def _episode(env, choose, budget=None):
    obs, info = env.reset(seed=0, options=None if budget is None else {"budget": budget})
    while True:
        assert env.observation_space.contains(obs)
        obs, r, done, trunc, info = env.step(choose(env))
        assert not trunc and type(r) is float
        if done:
            return info["compression"], info


@pytest.mark.parametrize("mode", ["layer", "channel"])
def test_check_env_both_checkers(tables, mode):
    env = CoefficientEnv(tables, synth_config(3.0), mode=mode, budgets=RANGE)
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)


# 600 x 64: an in-layer knapsack past the hull greedy's threshold, where at 3.3 bits the greedy's
# curve gives another (worse) plan than the exact one
WIDE = (*SHAPES, ("wide", "linear", 600, 64, ()))


@pytest.mark.parametrize("anchor", ["best", "dp"])
@pytest.mark.parametrize("shapes,budget", [(SHAPES, 3.0), (WIDE, 3.3)], ids=["small", "wide"])
def test_neutral_actions_give_the_calibrated_dp_plan(shapes, budget, anchor):
    # exactly the plan `compress --method dp` (and spdy's start) gives, the wide layer included;
    # with the 'best' anchor as long as no plan has scored above it
    tables = synth_tables(0, shapes)
    cfg = synth_config(budget, coef_anchor=anchor)
    env = CoefficientEnv(tables, cfg, mode="layer")
    s, _ = _episode(env, lambda e: e.neutral)
    dp = allocate_dp(tables, budget, cfg.cost)
    assert s.plan.key() == dp.key()
    # no metric: 'dp' pays only its proxy term, 0 at the DP plan; 'best' pays nothing
    assert s.reward == pytest.approx(0.0, abs=1e-12)
    assert s.proxy_error == pytest.approx(plan_error(dp, tables))


@pytest.mark.parametrize("mode", ["layer", "channel"])
def test_every_budget_of_the_range_is_met_and_observed(tables, mode):
    cfg = synth_config(3.0)
    env = CoefficientEnv(tables, cfg, mode=mode, budgets=RANGE)
    rng = np.random.default_rng(0)
    seen = set()
    for budget in RANGE:
        for _ in range(3):
            s, info = _episode(env, lambda e: int(rng.integers(e.action_space.n)), budget)
            assert info["budget"] == budget
            assert plan_avg_bits(s.plan, tables, cfg.cost) <= budget + 1e-9
            assert s.proxy_error >= env.dp_error(budget) * (1 - 1e-9)  # DP is proxy-optimal
        obs, _ = env.reset(options={"budget": budget})
        seen.add(round(float(obs[10 + 5 + 1]) * 8.0, 4))  # the budget, after the layer block
    assert seen == set(RANGE)
    # episodes without a named budget draw from the range
    drawn = {env.reset(seed=k)[1]["budget"] for k in range(40)}
    assert drawn == set(RANGE)
    with pytest.raises(InfeasibleBudgetError):
        env.reset(options={"budget": env.min_bits - 0.5})


def test_group_and_layer_coefficients_move_the_plan(tables):
    cfg = synth_config(3.0)
    env = CoefficientEnv(tables, cfg, mode="layer")
    n = env.neutral
    base = env.plan_for(3.0, [n] * 4, [[n] * len(g) for g in env.groups])
    # the most important group of fc1 made 10x cheaper to damage: its rows lose bits
    v = [[n] * len(g) for g in env.groups]
    v[2][0] = 0
    moved = env.plan_for(3.0, [n] * 4, v)
    rows = env.groups[2][0]
    assert sum(moved.layers["fc1"].row_bits[r] for r in rows) < \
        sum(base.layers["fc1"].row_bits[r] for r in rows)
    # a layer weighted 10x more gets more bits
    heavy = env.plan_for(3.0, [n, n, env.action_space.n - 1, n], [[n] * len(g) for g in
                                                                   env.groups])
    assert plan_avg_bits(heavy, tables[2:3], cfg.cost) > plan_avg_bits(base, tables[2:3],
                                                                       cfg.cost)


def test_plans_equal_a_fresh_dp_over_the_weighted_tables_whatever_was_solved_before(tables):
    # the env keeps each layer's knapsack tables per (layer, group multipliers) across plans:
    # every plan must still be the DP over that action's weighted tables, solved from scratch
    from automl_compress.database.tables import LayerTable

    cfg = synth_config(3.0)
    env = CoefficientEnv(tables, cfg, mode="channel")
    rng = np.random.default_rng(4)
    levels = env.action_space.n
    # three group-multiplier vectors revisited with new layer coefficients and budgets, so later
    # plans re-use tables kept by earlier ones
    vs = [[rng.integers(0, levels, len(g)) for g in env.groups] for _ in range(3)]
    for k in range(15):
        v = vs[k % 3]
        u = rng.integers(0, levels, len(tables))
        budget = float(rng.choice(RANGE))
        weighted = []
        for t, groups, vl in zip(tables, env.groups, v, strict=True):
            mult = np.empty(t.info.rows)
            for g, level in zip(groups, vl, strict=True):
                mult[g] = 10.0 ** env.values[level]
            weighted.append(LayerTable(t.info, t.bits, t.patterns, t.errors * mult[:, None, None]))
        fresh = allocate_dp(weighted, budget, cfg.cost, layer_weights=10.0 ** env.values[u])
        assert env.plan_for(budget, u, v).key() == fresh.key()


def _best_anchor(cfg):
    return dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, coef_anchor="best"))


def _anchor_obs(env, obs):
    at = 0
    for name, n in env.layout.blocks:
        if name == "anchor":
            return float(obs[at])
        at += n
    raise AssertionError("no anchor block")


def _fc1_bits(plan, budget=None):  # a metric that disagrees with the proxy: more bits in fc1
    return float(np.mean(plan.layers["fc1"].row_bits))


def test_best_anchor_moves_from_the_incumbent_and_pays_only_improvements(tables):
    cfg = _best_anchor(synth_config(3.0))
    probe = CoefficientEnv(tables, cfg, mode="layer")
    n, top = probe.neutral, probe.action_space.n - 1
    groups_n = [[n] * len(g) for g in probe.groups]
    ref = _fc1_bits(probe.plan_for(3.0, [n] * 4, groups_n))
    env = CoefficientEnv(tables, cfg, mode="layer", metric_fn=_fc1_bits,
                         reference_fn=lambda b: ref)

    def actions(by_layer):
        return lambda e: by_layer.get(e._l, n)

    # the neutral episode is the DP plan: no improvement, no incumbent
    s, _ = _episode(env, actions({}))
    assert s.reward == 0.0 and env.anchors.get(3.0) is None
    # fc1 (layer 2) weighted 10x: more bits there, paid 10 x the relative improvement
    s, _ = _episode(env, actions({2: top}))
    plan2 = env.plan_for(3.0, [n, n, top, n], groups_n)
    assert s.plan.key() == plan2.key() and s.metric > ref
    assert s.reward == pytest.approx(10.0 * (s.metric - ref) / ref)
    inc = env.anchors.get(3.0)
    assert inc.u == (n, n, top, n) and inc.metric == s.metric
    # the neutral episode now repeats the incumbent, and the observation carries it
    obs, _ = env.reset(options={"budget": 3.0})
    seen = []
    while True:
        if env._phase == "layer":
            seen.append(_anchor_obs(env, obs))
        obs, r, done, _, info = env.step(n)
        if done:
            break
    assert info["compression"].plan.key() == plan2.key() and r == 0.0
    assert seen == [0.0, 0.0, 1.0, 0.0]
    # moves are relative to the incumbent and clipped to the ladder; a worse plan is paid 0 and
    # leaves the incumbent as it is
    s, _ = _episode(env, actions({0: n + 1, 2: n - 1, 3: top}))
    assert s.plan.key() == env.plan_for(3.0, [n + 1, n, top - 1, top], groups_n).key()
    assert s.reward == pytest.approx(10.0 * max(0.0, s.metric - inc.metric) / inc.metric)
    assert (env.anchors.get(3.0) is inc) == (s.metric <= inc.metric)
    cur = env.anchors.get(3.0)
    assert cur.u[2] >= top - 1
    s, _ = _episode(env, actions({2: top}))  # n + 4 from level top or top - 1 stops at the top
    assert s.plan.key() == env.plan_for(3.0, [cur.u[0], cur.u[1], top, cur.u[3]],
                                        [list(g) for g in cur.v]).key()


def test_anchors_keep_the_best_per_budget_and_survive_a_checkpoint():
    a = Anchors()
    first = Incumbent((1, 2), ((0, 1), (2,)), 0.5, 3.0)
    assert a.offer(3.0, first) and a.get(3.0) is first and a.get(2.5) is None
    assert not a.offer(3.0, Incumbent((0, 0), ((0, 0), (0,)), 0.5, 1.0))  # a tie keeps the old
    better = Incumbent((4, 4), ((3, 3), (1,)), 0.75, 2.0)
    assert a.offer(3.0, better) and a.get(3.0) is better
    b = Anchors()
    b.restore(json.loads(json.dumps(a.state())))
    assert b.best == a.best


def test_anchors_lend_a_budget_off_the_training_grid_the_nearest_lower_incumbent():
    a = Anchors()
    low, mid = Incumbent((1,), ((0,),), 0.5, 3.0), Incumbent((2,), ((1,),), 0.6, 2.0)
    a.offer(2.5, low)
    a.offer(3.0, mid)
    trained = (2.5, 2.75, 3.0, 3.25)
    assert a.lend(3.125, trained) == 3.0 and a.get(3.125) is mid  # the nearest below
    assert a.lend(2.625, trained) == 2.5 and a.get(2.625) is low
    assert a.lend(3.125, trained) is None and a.get(3.125) is mid  # it has one now: kept
    # a training budget keeps what its run left, even with none
    assert a.lend(3.25, trained) is None and a.get(3.25) is None
    assert a.lend(2.75, trained) is None and a.get(2.75) is None
    # outside the training budgets' span: below it, and above it with incumbents below
    assert a.lend(2.4, trained) is None and a.get(2.4) is None
    assert a.lend(3.3, trained) is None and a.get(3.3) is None
    # between, with no incumbent below: the DP plan stays the start
    b = Anchors()
    b.offer(3.0, mid)
    assert b.lend(2.625, trained) is None and b.get(2.625) is None
    assert set(a.best) == {2.5, 3.0, 3.125, 2.625}


def _cfg(env=None, **agent):
    cfg = synth_config(3.0, budget_range=(2.5, 3.5), budget_step=0.25)
    base = {"action": "coefficient", "total_steps": 512, "n_steps": 64, "batch_size": 32,
            "n_epochs": 2, "round_steps": 128, "final_candidates": 2, "metric_fraction": 0.5}
    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **{**base, **agent}),
                               env=dataclasses.replace(cfg.env, metric_every=1, **(env or {})))


@pytest.mark.parametrize("agent", [{}, {"channel_controller": "knapsack"},
                                   {"layer_controller": "dp"},
                                   {"env": {"coef_anchor": "dp"}}])
def test_search_stops_at_its_evaluations_and_never_loses_to_dp(tables, agent):
    cfg = _cfg(**agent)

    def metric(plan, fraction):  # a metric that disagrees with the proxy about fc1
        fc1 = np.mean(plan.layers["fc1"].row_bits)
        return math.exp(-plan_error(plan, tables) / 800.0) + 0.01 * fc1 * fraction

    ev = Evaluator(metric, lambda f: int(round(100 * f)), budget=20.0)
    s = Search(tables, cfg, metric_dense=1.0, progress=Progress(512), evaluator=ev)
    s.train(10_000)
    assert s.exhausted() and s.progress.steps < 10_000
    assert ev.spent <= 20.0 - (cfg.agent.final_candidates + 1) + 0.5 + 1e-9
    best = s.finalize()
    assert ev.spent <= 20.0 + 1e-9
    dp = s.dp_plan(3.0)
    assert best.metric >= metric(dp, 1.0) - 1e-12
    assert plan_avg_bits(best.plan, tables, cfg.cost) <= 3.0 + 1e-9
    for b in RANGE:  # the trained policy answers every budget of the range within budget
        r = s.rollout(True, b, measure=False)
        assert plan_avg_bits(r.plan, tables, cfg.cost) <= b + 1e-9
    for b, inc in s.anchors.best.items():  # incumbents only ever beat the DP plan's score
        assert inc.metric > s.reference(b)
    s.close()


def test_search_on_the_whole_split_keeps_back_only_what_its_final_candidates_spend(tables):
    # scored on the whole split, the pool's plans and the DP plan are already known: finalize
    # needs at most the deterministic rollout's pass, so the run ends within one of its budget
    cfg = _cfg(metric_fraction=1.0, env={"coef_anchor": "best", "budget_range": ()})

    def metric(plan, fraction):
        return _fc1_bits(plan) + 0.01 * math.exp(-plan_error(plan, tables) / 800.0)

    ev = Evaluator(metric, lambda f: int(round(100 * f)), budget=20.0)
    s = Search(tables, cfg, metric_dense=1.0, progress=Progress(512), evaluator=ev)
    s.train(10_000)
    assert s.exhausted()
    s.finalize()
    assert 19.0 - 1e-9 <= ev.spent <= 20.0 + 1e-9
    s.close()


def test_best_anchor_search_climbs_from_the_dp_plan_and_final_rollouts_leave_it(tables):
    cfg = _cfg(env={"coef_anchor": "best", "budget_range": ()})

    def metric(plan, fraction):  # strongly disagrees with the proxy: fc1's bits first
        return _fc1_bits(plan) + 0.01 * math.exp(-plan_error(plan, tables) / 800.0) + fraction

    ev = Evaluator(metric, lambda f: int(round(100 * f)), budget=20.0)
    s = Search(tables, cfg, metric_dense=1.0, progress=Progress(512), evaluator=ev)
    s.train(10_000)
    inc = s.anchors.get(3.0)
    assert inc is not None and inc.metric > s.reference(3.0)
    assert s.tracker.best.metric == inc.metric  # the incumbent is the best training plan
    incumbents = dict(s.anchors.best)
    best = s.finalize()
    assert s.anchors.best == incumbents  # final rollouts (scored in full) never move them
    assert best.metric >= metric(s.dp_plan(3.0), 1.0) and ev.spent <= 20.0 + 1e-9
    s.close()


def test_neutral_partner_is_the_default(tables):
    env = CoefficientEnv(tables, synth_config(3.0), mode="channel", layer_policy=NEUTRAL)
    s, _ = _episode(env, lambda e: e.neutral)
    assert s.steps == sum(len(g) for g in env.groups)


def test_gap_weights_are_the_gaps_plus_a_floor_and_unknown_gaps_count_as_the_largest():
    p = gap_weights([0.2, 0.0, None, 0.1, -0.05])
    gaps = np.array([0.2, 0.0, 0.2, 0.1, 0.0])  # unknown: the largest known gap; above dense: 0
    w = gaps + 0.1 * gaps.mean()
    assert p == pytest.approx(w / w.sum())
    assert p[1] == p[4] == pytest.approx(0.1 * gaps.mean() / w.sum())  # only the floor
    assert gap_weights([None, None, None]) == pytest.approx([1 / 3] * 3)  # nothing known yet
    assert gap_weights([0.0, 0.0]) == pytest.approx([0.5, 0.5])


def _gap_env(tables, draw="gap", budgets=RANGE, seed=7):
    # dense 1.0; incumbents at 2.5 (gap 0.4) and 3.5 (at dense: gap 0); the DP plan's score
    # known at 2.75 (gap 0.2) and 3.0 (gap 0.1); nothing known at 3.25 (the largest gap, 0.4)
    anchors = Anchors()
    anchors.offer(2.5, Incumbent((0,), ((0,),), 0.6, 1.0))
    anchors.offer(3.5, Incumbent((0,), ((0,),), 1.0, 1.0))
    env = CoefficientEnv(tables, synth_config(3.0, budget_draw=draw, coef_anchor="best"),
                         mode="layer", budgets=budgets, anchors=anchors, metric_dense=1.0,
                         known_reference={2.75: 0.8, 3.0: 0.9}.get)
    env.reset(seed=seed)
    return env


def _draws(env, n):
    return [env.reset()[1]["budget"] for _ in range(n)]


def test_gap_draw_follows_the_gaps_and_is_reproducible(tables):
    env = _gap_env(tables)
    p = env.draw_probabilities()
    w = np.array([0.4, 0.2, 0.1, 0.4, 0.0])
    w = w + 0.1 * w.mean()
    assert p == pytest.approx(w / w.sum())
    n = 6000
    draws = _draws(env, n)
    freq = np.array([draws.count(b) for b in RANGE]) / n
    assert freq == pytest.approx(p, abs=0.02)
    assert freq[4] < 0.04  # the budget at dense is drawn at the floor rate only (p = 0.0185)
    assert freq[0] > 0.3 > 1 / len(RANGE)
    assert _draws(_gap_env(tables), n) == draws  # seeded: the same sequence again
    assert _draws(_gap_env(tables, seed=8), 50) != draws[:50]


def test_uniform_draw_and_single_budgets_are_as_before(tables):
    from gymnasium.utils.seeding import np_random

    rng, _ = np_random(7)  # the draw before budget_draw existed: integers on the env's generator
    expected = [RANGE[int(rng.integers(len(RANGE)))] for _ in range(201)]
    assert _draws(_gap_env(tables, draw="uniform"), 200) == expected[1:]  # after the seeding
    # one budget: 'gap' draws it as 'uniform' does, with the same use of the generator
    envs = [_gap_env(tables, draw=d, budgets=(3.0,)) for d in ("uniform", "gap")]
    assert _draws(envs[0], 20) == _draws(envs[1], 20) == [3.0] * 20
    assert envs[0].np_random.bit_generator.state == envs[1].np_random.bit_generator.state


def _metric_fc1(tables):
    def metric(plan, fraction):
        return 0.5 * _fc1_bits(plan) / 8 + 0.01 * math.exp(-plan_error(plan, tables) / 800.0)
    return metric


def test_search_single_budget_runs_are_the_same_with_the_gap_draw(tables):
    runs = []
    for draw in ("uniform", "gap"):
        cfg = _cfg(env={"budget_range": (), "budget_draw": draw})
        ev = Evaluator(_metric_fc1(tables), lambda f: int(round(100 * f)), budget=12.0)
        s = Search(tables, cfg, metric_dense=0.9, progress=Progress(512), evaluator=ev)
        s.train(10_000)
        runs.append((s.progress.steps, ev.spent, dict(s.anchors.best), s.finalize().plan.key()))
        s.close()
    assert runs[0] == runs[1]


def test_search_gap_draw_reads_the_incumbents_and_known_references_without_spending(tables):
    cfg = _cfg(env={"budget_draw": "gap"})
    ev = Evaluator(_metric_fc1(tables), lambda f: int(round(100 * f)), budget=16.0)
    s = Search(tables, cfg, metric_dense=0.9, progress=Progress(512), evaluator=ev)
    s.train(10_000)
    spent = ev.spent
    env = s.envs["layer_controller"].unwrapped
    measured = 0
    for b in env.budgets:
        inc = s.anchors.get(b)
        ref = ev.known(s.dp_plan(b), cfg.agent.metric_fraction)
        want = 0.9 - inc.metric if inc is not None else (None if ref is None else 0.9 - ref)
        assert env.budget_gap(b) == (None if want is None else pytest.approx(want))
        measured += want is not None
    assert measured >= 2 and ev.spent == spent  # the draw spent no evaluation
    assert env.draw_probabilities().sum() == pytest.approx(1.0)
    s.close()
