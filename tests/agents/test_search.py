"""The orchestrator, controllers, save/load and manifest checks over synthesised tables."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from synth import synth_config, synth_tables

from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.agents.tracking import MetricOracle
from automl_compress.agents.transfer import check_manifest, load_models, read_manifest, save_policy
from automl_compress.config import load_config
from automl_compress.database.allocate import plan_avg_bits, plan_error
from automl_compress.envs.features import FEATURE_VERSION
from automl_compress.errors import ConfigError, PolicyMismatchError
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.search import Evaluator

STEPS = 256


def _cfg(budget=3.0, **agent):
    cfg = synth_config(budget)
    base = {"total_steps": STEPS, "n_steps": 64, "batch_size": 32, "n_epochs": 2,
            "round_steps": 128, "final_candidates": 2}
    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **{**base, **agent}))


def _metric(tables):
    return lambda plan: math.exp(-plan_error(plan, tables) / 500.0)


def _search(cfg, tables, **kw):
    return Search(tables, cfg, metric_fn=_metric(tables), metric_dense=1.0,
                  progress=Progress(cfg.agent.total_steps), **kw)


@pytest.fixture(scope="module")
def tables():
    return synth_tables(0)


@pytest.mark.parametrize("agent", [
    {"form": "hierarchical"},
    {"form": "hierarchical", "channel_controller": "knapsack"},
    {"form": "hierarchical", "action": "budget"},
    {"form": "flat"},
    {"form": "haq"},
    {"form": "hierarchical", "action": "budget", "channel_controller": "knapsack"},
    {"form": "hierarchical", "action": "budget", "channel_controller": "uniform"},
    {"form": "hierarchical", "action": "budget", "layer_controller": "dp"},
])
def test_every_form_trains_and_keeps_a_within_budget_best(tables, agent):
    cfg = _cfg(**agent)
    s = _search(cfg, tables)
    s.train(STEPS)
    cands = s.final_candidates()
    assert s.progress.steps >= STEPS
    assert len(cands) == 2 and all(math.isfinite(c.metric) for c in cands)
    best = s.tracker.best
    assert best is not None and math.isfinite(best.metric)
    # the best is the highest measured metric among everything seen
    assert best.metric >= max(c.metric for c in cands)
    assert plan_avg_bits(best.plan, tables) <= 3.0 + 1e-9
    s.close()


def test_hierarchical_alternates_turns(tables):
    s = _search(_cfg(total_steps=512, round_steps=128), tables)
    sched = s.schedule(0, 512)
    assert [n for n, _ in sched] == ["layer_controller", "channel_controller"] * 2
    assert s.schedule(200, 512)[0] == ("channel_controller", 56)  # resume mid-turn
    s.close()


def test_same_seed_same_plan(tables):
    plans = []
    for _ in range(2):
        s = _search(_cfg(), tables)
        s.train(STEPS)
        plans.append(s.rollout().plan.to_dict())
        s.close()
    assert plans[0] == plans[1]


def test_policy_save_load_gives_identical_actions(tables, tmp_path):
    cfg = _cfg()
    s = _search(cfg, tables)
    s.train(STEPS)
    save_policy(tmp_path, s.models, cfg, s.progress.steps)
    loaded = load_models(tmp_path, list(s.models))
    s2 = _search(cfg, synth_tables(1), models=loaded)  # another model, same spaces
    rng = np.random.default_rng(0)
    for name, model in s.models.items():
        env = s2.envs[name]
        obs = rng.uniform(-1, 1, size=(32, *env.observation_space.shape)).astype(np.float32)
        masks = rng.random((32, env.action_space.n)) < 0.6
        masks[:, 0] = True
        a1, _ = model.predict(obs, action_masks=masks, deterministic=True)
        a2, _ = s2.models[name].predict(obs, action_masks=masks, deterministic=True)
        assert np.array_equal(a1, a2)
        assert masks[np.arange(32), a2].all()
    assert s.rollout().plan.to_dict() == _search(cfg, tables, models=load_models(
        tmp_path, list(s.models))).rollout().plan.to_dict()
    s.close()
    s2.close()


def test_manifest_records_spec_and_mismatch_names_the_difference(tables, tmp_path):
    cfg = _cfg()
    s = _search(cfg, tables)
    save_policy(tmp_path, s.models, cfg, 0)
    m = read_manifest(tmp_path)
    assert m["menu"] == {"bits": [0, 2, 3, 4, 6, 8], "patterns": ["dense", "2:4"]}
    assert m["feature_version"] == FEATURE_VERSION and m["normalisation"]["obs_size"] > 0
    assert set(m["files"]) == {"layer_controller", "channel_controller"}
    check_manifest(m, cfg)  # fits itself
    other = dataclasses.replace(cfg, menu=dataclasses.replace(cfg.menu, bits=(0, 2, 4, 8)))
    with pytest.raises(PolicyMismatchError, match=r"menu\.bits: policy has \[0, 2, 3, 4, 6, 8\]"):
        check_manifest(m, other)
    other = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, groups=4))
    with pytest.raises(PolicyMismatchError, match="env.groups"):
        check_manifest(m, other)
    with pytest.raises(PolicyMismatchError, match="manifest.json"):
        read_manifest(tmp_path / "nothing")
    s.close()


def test_metric_oracle_every_k_with_cache_and_force():
    calls = []

    def fn(plan, fraction):
        calls.append(fraction)
        return 0.5

    o = MetricOracle(Evaluator(fn, lambda f: 1), every=3)
    plans = [CompressionPlan({"a": LayerPlan("dense", (b, 2))}) for b in (2, 3, 4, 6, 8)]
    got = [o(p) for p in plans]
    assert got == [0.5, None, None, 0.5, None] and len(calls) == 2
    assert o(plans[0]) == 0.5 and len(calls) == 2  # cached
    o.force = True
    assert o(plans[1]) == 0.5 and len(calls) == 3


def test_metric_oracle_scores_partially_and_stops_at_its_budget():
    calls = []

    def fn(plan, fraction):
        calls.append(fraction)
        return fraction

    # 100 validation items; 4 full passes, 1 kept back for the final candidates
    ev = Evaluator(fn, lambda f: int(round(100 * f)), budget=4.0)
    o = MetricOracle(ev, every=1, fraction=0.25, reserve=1.0)
    plans = [CompressionPlan({"a": LayerPlan("dense", (b, b))}) for b in range(2, 9)] + \
        [CompressionPlan({"a": LayerPlan("dense", (b, 2))}) for b in range(3, 9)]
    got = [o(p) for p in plans]
    assert got[:12] == [0.25] * 12 and got[12] is None and o.exhausted  # 12 x 0.25 = 3 passes
    assert o.evaluations == pytest.approx(3.0)
    assert o.measure(plans[0]) == 1.0 and o.evaluations == pytest.approx(4.0)  # the reserve
    assert o.measure(plans[1]) is None and calls.count(1.0) == 1


def test_config_typos_and_bad_values_are_named_errors():
    with pytest.raises(ConfigError, match="did you mean 'channel_controller'"):
        load_config(None, ["agent.chanel_controller=knapsack"])
    with pytest.raises(ConfigError, match="agent.channel_controller must be one of"):
        load_config(None, ["agent.channel_controller=greedy"])
    with pytest.raises(ConfigError, match="leaves nothing to learn"):
        load_config(None, ["agent.layer_controller=dp", "agent.channel_controller=knapsack"])
    with pytest.raises(ConfigError, match="prune_fractions"):
        load_config(None, ["env.prune_fractions=[0.5, 0.0]"])
    with pytest.raises(ConfigError, match=r"agent.ent_coef must be in \[0, 1\), found -0.1"):
        load_config(None, ["agent.ent_coef=-0.1"])


def test_the_entropy_bonus_reaches_both_ppo_controllers(tables):
    s = _search(_cfg(ent_coef=0.03), tables)
    assert {n: m.ent_coef for n, m in s.models.items()} == {"layer_controller": 0.03,
                                                             "channel_controller": 0.03}
    s.close()


@pytest.mark.parametrize(("action", "anchor", "setting", "expected"), [
    ("coefficient", "best", None, False),  # unset: off where only the incumbent's improvements pay
    ("coefficient", "dp", None, True),  # unset: SB3's default where every episode is paid
    ("budget", "best", None, True),  # and where every step is
    ("coefficient", "best", True, True),
    ("budget", "best", False, False),
])
def test_advantage_normalisation_reaches_both_ppo_controllers(tables, action, anchor, setting,
                                                              expected):
    cfg = _cfg(action=action, normalize_advantage=setting)
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, coef_anchor=anchor))
    s = _search(cfg, tables)
    assert {n: m.normalize_advantage for n, m in s.models.items()} == {
        "layer_controller": expected, "channel_controller": expected}
    s.close()


def test_final_candidates_measured_as_one_batch_match_one_by_one():
    def score(plan, fraction):
        return float(plan.layers["l"].row_bits[0])

    plans = [CompressionPlan({"l": LayerPlan("dense", (b,))}) for b in (2, 3, 2, 4, 5)]
    batches = []

    def many(ps, fraction):
        batches.append(len(ps))
        return [score(p, fraction) for p in ps]

    one = MetricOracle(Evaluator(score, lambda f: 1, budget=3))
    expected = [one.measure(p) for p in plans]
    oracle = MetricOracle(Evaluator(score, lambda f: 1, budget=3, score_many=many))
    assert oracle.measure_many(plans) == expected == [2.0, 3.0, 2.0, 4.0, None]
    assert batches == [3] and oracle.evaluator.calls == one.evaluator.calls == 3


def test_metric_oracle_books_every_pass_at_the_scored_plans_budget():
    def score(plan, fraction):
        return float(plan.layers["l"].row_bits[0])

    def at(bits, budget):
        meta = {} if budget is None else {"budget_bits": budget}
        return CompressionPlan({"l": LayerPlan("dense", (bits,))}, meta=meta)

    ev = Evaluator(score, lambda f: int(round(100 * f)), budget=10.0,
                   score_many=lambda ps, f: [score(p, f) for p in ps])
    o = MetricOracle(ev, fraction=0.25, budget=3.0)
    o(at(2, 2.5))
    o(at(3, 2.5))
    o(at(2, 2.5))  # cached: free
    o(at(4, 4.0))
    o.measure(at(5, None))  # no budget in its meta: the run's
    o.measure_many([at(6, 4.0), at(7, 2.5), at(6, 4.0), at(8, 3.0)])
    assert o.by_budget == pytest.approx({2.5: 1.5, 4.0: 1.25, 3.0: 2.0})
    assert sum(o.by_budget.values()) == pytest.approx(o.evaluations)


@pytest.mark.parametrize("moves", [0.5, 2.0])
def test_a_new_layer_controller_moves_layer_moves_coefficients_an_episode(tables, moves):
    cfg = _cfg(layer_moves=moves)
    s = _search(cfg, tables)
    levels = cfg.env.coef_levels
    # the initial action net adds logits of about 0.01 to the bias: a few percent off at most
    expected = len(tables) * (1.0 - _p_neutral(s, "layer_controller", levels))
    assert expected == pytest.approx(moves, rel=0.05)
    bonus = cfg.agent.neutral_prior
    p_channel = math.exp(bonus) / (math.exp(bonus) + levels - 1)
    assert _p_neutral(s, "channel_controller", levels) == pytest.approx(p_channel, rel=0.02)
    # the same read along a whole episode, as TensorBoard and bench/search.py report it
    assert s.expected_moves("layer_controller") == pytest.approx(moves, rel=0.05)
    groups = sum(len(g) for g in s._reference_env().groups)
    assert s.expected_moves("channel_controller") == pytest.approx(groups * (1 - p_channel),
                                                                   rel=0.1)
    s.close()


@pytest.mark.parametrize("moves", [1.0, 3.0])
def test_a_new_channel_controller_moves_channel_moves_groups_an_episode(tables, moves):
    cfg = _cfg(channel_moves=moves)
    s = _search(cfg, tables)
    groups = sum(len(g) for g in s._reference_env().groups)
    assert groups > 3 * moves  # enough groups that the bonus is not clipped to the uniform 0
    p = _p_neutral(s, "channel_controller", cfg.env.coef_levels)
    assert groups * (1.0 - p) == pytest.approx(moves, rel=0.05)
    assert s.expected_moves("channel_controller") == pytest.approx(moves, rel=0.1)
    assert s.expected_moves("layer_controller") == pytest.approx(cfg.agent.layer_moves, rel=0.05)
    s.close()


def _p_neutral(s, name, levels):
    """The probability of the neutral action at the first decision of ``name``'s env."""
    import torch

    env = s.envs[name]
    obs, _ = env.reset(seed=0)
    o = torch.as_tensor(np.asarray(obs)[None], dtype=torch.float32)
    mask = np.ones((1, levels), dtype=bool)
    with torch.no_grad():
        probs = s.models[name].policy.get_distribution(o, action_masks=mask).distribution.probs
    return float(probs[0, (levels - 1) // 2])


def test_expected_moves_names_a_controller_it_cannot_read(tables):
    s = _search(_cfg(action="budget"), tables)
    with pytest.raises(ConfigError, match="found 'layer_controller'"):
        s.expected_moves("layer_controller")
    s.close()


def test_layer_moves_bonus_is_never_below_the_uniform_policy():
    from automl_compress.agents.controllers import moves_bonus

    assert moves_bonus(36, 9, 1.0) == pytest.approx(math.log(8 * 35))
    assert moves_bonus(1, 9, 1.0) == 0.0  # one decision: it cannot move less than uniformly
    with pytest.raises(ValueError, match="moves > 0"):
        moves_bonus(5, 9, 0.0)
    with pytest.raises(ConfigError, match="agent.layer_moves"):
        load_config(None, ["agent.layer_moves=0"])
    with pytest.raises(ConfigError, match="agent.channel_moves must be > 0, found -1"):
        load_config(None, ["agent.channel_moves=-1"])


def test_warm_up_scores_random_episodes_before_training_and_no_model_learns_from_them(tables):
    import torch

    cfg = _cfg(warmup_episodes=3)
    s = _search(cfg, tables)
    before = {n: [p.detach().clone() for p in m.policy.parameters()]
              for n, m in s.models.items()}
    s.warm_up(cfg.agent.warmup_episodes)
    assert s.tracker.episodes == 3
    assert s.progress.steps == 3 * len(tables)  # one layer decision a step
    # the DP reference and the random plans, each new one scored once
    assert s.oracle.evaluator.spent >= 3
    for n, m in s.models.items():
        assert all(torch.equal(a, b) for a, b in zip(before[n], m.policy.parameters(),
                                                      strict=True))
    s.close()


def test_a_fresh_run_warms_up_and_a_fine_tune_does_not(tables):
    cfg = _cfg(warmup_episodes=2)
    s = _search(cfg, tables)
    s.train(1)  # the warm-up's 2 episodes pass the 1 step asked for: no PPO rollout after
    assert s.tracker.episodes == 2 and s.progress.steps == 2 * len(tables)
    models = dict(s.models)
    s.close()
    t = _search(cfg, tables, models=models)  # a fine-tune of the same controllers
    t.train(1)
    assert t.progress.steps == cfg.agent.n_steps  # one PPO rollout, no warm-up before it
    t.close()


@pytest.mark.parametrize("agent", [{"form": "hierarchical"}, {"form": "haq"}])
def test_training_without_tensorboard_leaves_no_folders_in_the_temp_dir(tables, agent,
                                                                         tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s = _search(_cfg(total_steps=128, round_steps=64, **agent), tables)
    s.train(128)
    s.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("SB3-")] == []
