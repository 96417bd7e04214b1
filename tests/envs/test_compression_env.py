"""The compression env over synthesised exact tables: API checks, budget, rewards, features."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from synth import SHAPES, synth_config, synth_tables

from automl_compress.agents.policies import CHANNEL_POLICIES, LAYER_POLICIES
from automl_compress.database.allocate import (
    allocate_dp,
    min_feasible_avg_bits,
    plan_avg_bits,
    plan_bits,
    plan_error,
)
from automl_compress.database.knapsack import knapsack_layer
from automl_compress.envs import CompressionEnv
from automl_compress.envs.haq_env import HAQEnv
from automl_compress.envs.policy import RowRequest
from automl_compress.errors import ConfigError, InfeasibleBudgetError
from automl_compress.plan import CompressionPlan

MODES = [
    ("flat", {}),
    ("layer", {"channel_policy": "knapsack"}),
    ("layer", {"channel_policy": "uniform"}),
    ("channel", {"layer_policy": "dp"}),
]


def _env(tables, cfg, mode, kw):
    """The env with the named built-in policies of ``kw`` ('knapsack', 'uniform', 'dp')."""
    given = {"channel_policy": lambda name: CHANNEL_POLICIES[name](),
             "layer_policy": lambda name: LAYER_POLICIES[name](tables, cfg)}
    return CompressionEnv(tables, cfg, mode=mode, **{k: given[k](v) for k, v in kw.items()})


def _run(env, choose, seed=0):
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        assert env.observation_space.contains(obs)
        obs, r, done, trunc, info = env.step(choose(env))
        assert type(r) is float
        assert not trunc
        total += r
        steps += 1
        if done:
            return info["compression"], total, steps


@pytest.mark.parametrize("mode,kw", MODES)
def test_check_env_both_checkers(tables, mode, kw):
    env = _env(tables, synth_config(3.0), mode, kw)
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)


def test_haq_env_checks(tables):
    env = HAQEnv(tables, synth_config(3.0))
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)


def _adversaries(env, rng):
    n = env.action_space.n
    return {
        "random": lambda e: int(rng.integers(n)),
        "max": lambda e: n - 1,  # always the dearest action, ignoring masks
        "out_of_range": lambda e: n + 5,
        "masked_random": lambda e: int(rng.choice(np.flatnonzero(e.action_masks()))),
        "dearest_allowed": lambda e: int(np.flatnonzero(e.action_masks())[-1]),
    }


@pytest.mark.parametrize("mode,kw", MODES)
def test_budget_holds_for_random_and_adversarial_actions(tables, mode, kw):
    minimum = min_feasible_avg_bits(tables)
    for budget in (minimum + 1e-9, 2.0, 3.0, 5.0):
        env = _env(tables, synth_config(budget), mode, kw)
        rng = np.random.default_rng(1)
        for name, choose in _adversaries(env, rng).items():
            s, _, _ = _run(env, choose)
            assert s.avg_bits <= budget + 1e-9, (mode, budget, name)
            assert plan_avg_bits(s.plan, tables) == pytest.approx(s.avg_bits, rel=1e-12)
            assert set(s.plan.layers) == {t.info.name for t in tables}
            if name in ("masked_random", "dearest_allowed"):
                assert s.projections == 0
            if name == "out_of_range":
                assert s.projections == s.steps  # every such action is projected and counted


def test_projection_reported_in_info(tables):
    env = CompressionEnv(tables, synth_config(2.0), mode="flat")
    env.reset(seed=0)
    mask = env.action_masks()
    bad = int(np.flatnonzero(~mask)[0])
    _, _, _, _, info = env.step(bad)
    assert info["projected"] is True and info["projections"] == 1
    good = int(np.flatnonzero(env.action_masks())[0])
    _, _, _, _, info = env.step(good)
    assert info["projected"] is False and info["projections"] == 1


def test_budget_below_minimum_is_named_error(tables):
    bits = (2, 3, 4, 6, 8)  # no 0 bits: every row costs at least its 2-bit price
    minimum = min_feasible_avg_bits(synth_tables(0, bits=bits))
    assert minimum > 1.0
    cfg = synth_config(0.9 * minimum, bits=bits)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget"):
        CompressionEnv(synth_tables(0, bits=bits), cfg, mode="flat")


def test_mode_without_policy_is_config_error(tables):
    with pytest.raises(ConfigError, match="channel_policy"):
        CompressionEnv(tables, synth_config(3.0), mode="layer")


def test_reset_is_reproducible_and_fresh(tables):
    env = CompressionEnv(tables, synth_config(3.0), mode="flat")
    rng = np.random.default_rng(3)
    actions = [int(a) for a in rng.integers(env.action_space.n, size=200)]

    def replay():
        obs, _ = env.reset(seed=7)
        trace = [obs]
        for a in actions:
            obs, r, done, _, info = env.step(a)
            trace.append(obs)
            if done:
                return trace, info["compression"]
        raise AssertionError("episode did not end")

    t1, s1 = replay()
    t2, s2 = replay()
    assert all(np.array_equal(a, b) for a, b in zip(t1, t2, strict=True))
    assert s1.plan.to_dict() == s2.plan.to_dict() and s1.reward == s2.reward


def test_step_rewards_sum_to_scaled_proxy_and_metric_term(tables):
    cfg = synth_config(3.0, step_reward_weight=2.0, metric_reward_weight=0.5)
    dense = 0.9

    def metric(plan):  # any deterministic function of the plan will do for the reward algebra
        return dense - 1e-3 * plan_error(plan, tables)

    env = CompressionEnv(tables, cfg, mode="flat", metric_fn=metric, metric_dense=dense)
    rng = np.random.default_rng(0)
    s, total, _ = _run(env, lambda e: int(rng.choice(np.flatnonzero(e.action_masks()))))
    assert s.proxy_error == pytest.approx(plan_error(s.plan, tables), rel=1e-9)
    expected = -2.0 * s.proxy_error / env.e_ref + 0.5 * 10 * (s.metric - dense) / dense
    assert total == pytest.approx(expected, rel=1e-9)
    assert s.reward == pytest.approx(total, rel=1e-12)


def test_skipped_metric_gives_no_end_term(tables):
    env = CompressionEnv(tables, synth_config(3.0), mode="flat", metric_fn=lambda p: None)
    s, total, _ = _run(env, lambda e: int(np.flatnonzero(e.action_masks())[0]))
    assert math.isnan(s.metric)
    assert total == pytest.approx(-s.proxy_error / env.e_ref, rel=1e-9)


def test_dp_layer_budgets_bound_every_channel_agent(tables):
    """channel env with the DP's layer budgets: each layer stays within its DP budget, and no
    channel agent beats the DP plan, whose rows are the exact knapsack at those budgets."""
    cfg = synth_config(3.0)
    dp = allocate_dp(tables, 3.0)
    dp_bits = {t.info.name: plan_bits(CompressionPlan({t.info.name: dp.layers[t.info.name]}),
                                      [t]) for t in tables}
    knapsack_err = sum(
        t.error_of(dp.layers[t.info.name].pattern,
                   knapsack_layer(t, dp.layers[t.info.name].pattern, dp_bits[t.info.name]))
        for t in tables)
    assert knapsack_err == pytest.approx(plan_error(dp, tables), rel=1e-12)
    env = _env(tables, cfg, "channel", {"layer_policy": "dp"})
    rng = np.random.default_rng(0)
    agents = [lambda e: int(np.flatnonzero(e.action_masks())[-1]),
              lambda e: int(np.flatnonzero(e.action_masks())[0]),
              lambda e: int(rng.choice(np.flatnonzero(e.action_masks())))]
    for agent in agents:
        s, _, _ = _run(env, agent)
        assert s.proxy_error >= plan_error(dp, tables) - 1e-9
        for t in tables:
            one = CompressionPlan({t.info.name: s.plan.layers[t.info.name]})
            assert plan_bits(one, [t]) <= dp_bits[t.info.name] + 1e-9


def test_knapsack_channels_at_the_dp_layer_budgets_give_the_dp_plan(tables):
    """The knapsack channel policy, handed each layer's DP pattern and DP bits with its rows in
    the env's importance order, returns exactly the DP's layer error within those bits."""
    dp = allocate_dp(tables, 3.0)
    cfg = synth_config(3.0)
    policy = CHANNEL_POLICIES["knapsack"]()
    for t in tables:
        lp = dp.layers[t.info.name]
        p = t.patterns.index(lp.pattern)
        budget = plan_bits(CompressionPlan({t.info.name: lp}), [t])
        order = np.argsort(-t.errors[:, p, :].sum(axis=1), kind="stable")
        ob = t.option_bits(cfg.cost)[p]
        idx = policy.fill_rows(RowRequest(t, p, order, budget, ob, cfg.cost))
        assert float(ob[idx].sum()) <= budget + 1e-9
        got = float(t.errors[order, p, idx].sum())
        assert got == pytest.approx(t.error_of(lp.pattern, lp.row_bits), rel=1e-12), t.info.name


def test_knapsack_channels_keep_tables_and_answer_as_a_fresh_knapsack(tables):
    """One policy asked many budgets of the same few (layer, pattern, kept rows) keeps one set
    of knapsack tables per set and gives the assignment a fresh policy gives every time."""
    cfg = synth_config(3.0)
    kept = CHANNEL_POLICIES["knapsack"]()
    rng = np.random.default_rng(0)
    keys = set()
    for _ in range(60):
        t = tables[int(rng.integers(len(tables)))]
        p = int(rng.integers(len(t.patterns)))
        order = np.argsort(-t.errors[:, p, :].sum(axis=1), kind="stable")
        if rng.integers(2):  # another row set of the same size: the other half
            order = order[::-1]
        rows = order[: int(rng.choice([t.info.rows, max(t.info.rows // 2, 1)]))]
        ob = t.option_bits(cfg.cost)[p]
        budget = float(rng.uniform(len(rows) * ob.min(), len(rows) * ob.max()))
        req = RowRequest(t, p, rows, budget, ob, cfg.cost)
        want = CHANNEL_POLICIES["knapsack"]().fill_rows(req)
        assert kept.fill_rows(req).tolist() == want.tolist()
        keys.add((t.info.name, p, tuple(rows.tolist())))
    assert len(kept._kept) == len(keys)


def test_observation_size_is_model_independent():
    wide = tuple((n, k, 2 * r + 3, c, kern) for n, k, r, c, kern in SHAPES) + (
        ("fc3", "linear", 7, 40, ()),)
    small = CompressionEnv(synth_tables(0), synth_config(3.0), mode="flat")
    big = CompressionEnv(synth_tables(1, shapes=wide), synth_config(3.0), mode="flat")
    assert small.observation_space == big.observation_space
    assert small.action_space == big.action_space
    for env in (small, big):
        obs, _ = env.reset(seed=0)
        assert np.all(np.abs(obs) <= 8.0) and np.isfinite(obs).all()


def test_haq_action_wall_enforces_budget_and_is_reported(tables):
    env = HAQEnv(tables, synth_config(2.5))
    env.reset(seed=0)
    done = False
    while not done:  # the dearest width everywhere: far over budget
        _, r, done, _, info = env.step(np.array([1.0], dtype=np.float32))
    s = info["compression"]
    assert s.avg_bits <= 2.5 + 1e-9 and plan_avg_bits(s.plan, tables) == pytest.approx(s.avg_bits)
    assert info["projected"] and s.projections > 0
    assert type(r) is float


def test_budget_at_the_exact_minimum_without_zero_bits():
    bits = (2, 3, 4, 6, 8)
    tabs = synth_tables(2, bits=bits)
    minimum = min_feasible_avg_bits(tabs)
    env = CompressionEnv(tabs, synth_config(minimum, bits=bits), mode="flat")
    rng = np.random.default_rng(0)
    s, _, _ = _run(env, lambda e: int(rng.integers(e.action_space.n)))
    assert s.avg_bits <= minimum + 1e-9
    assert all(min(lp.row_bits) == 2 for lp in s.plan.layers.values())
