"""The config sections of the RL search: the compression environment and its controllers.

:class:`EnvConfig` shapes the episodes (budgets, groups, reward weights, action ladders, the
coefficient form's actions) and :class:`AgentConfig` the controllers that act in them (form,
action, which controllers learn, the PPO schedule). Both are typed, frozen and validate
themselves in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass

from automl_compress.errors import ConfigError

COEF_ANCHORS = ("dp", "best")
BUDGET_DRAWS = ("uniform", "gap")


@dataclass(frozen=True)
class EnvConfig:
    """The compression environment (docs/env.md; formula in automl_compress/envs/rewards.py).

    Attributes:
        budget_bits: the budget in average bits per compressible weight (metadata included).
        budget_range: () or (low, high): train one policy for every budget of the grid from low
            to high in steps of ``budget_step`` (the observation carries the budget); the run's
            plan is for ``budget_bits``, which must lie in the range.
        budget_step: the grid step of ``budget_range``.
        budget_draw: how a coefficient-form episode of a ``budget_range`` run draws its budget:
            'uniform' (every budget of the grid alike) or 'gap' (in proportion to how far the
            budget's incumbent, or the calibrated DP plan's measured score while it has none,
            is below the dense model's validation metric, plus a floor of 10 % of the mean gap,
            so evaluations go where there is most to gain; envs/coef_env.py ``gap_weights``).
            Runs at one budget are unaffected. 'gap' is the default since 2026-12-07: on
            user_model's 2.5-4 bit range it is ahead of 'uniform' on the zero-shot plans' mean
            test and validation metric, and on digits' and crepe_tiny's ranges over the grid,
            all of it at their lowest budget (docs/benchmarks.md §3).
        groups: K, the channel controller's importance groups per layer.
        step_reward_weight: w_step of the per-step table-error term.
        metric_reward_weight: w_metric of the episode-end true-metric term.
        layer_levels: budget levels per layer (a ladder from the layer's cheapest to its
            dearest option).
        prune_fractions: the layer controller's 0-bit fractions (least important rows removed);
            only the first (0.0) is offered when the menu has no 0 bits.
        metric_every: the true metric is measured every this many episodes (and for the final
            candidates); other episodes get no end term. The coefficient form
            (``agent.action='coefficient'``) measures every episode: its episodes have no
            per-step reward, so an unmeasured one would teach nothing but the proxy.
        coef_levels: the coefficient form's actions: this many log10 coefficients from
            ``-coef_span`` to ``coef_span`` (odd, so the middle one is 0 = the calibrated DP).
        coef_span: the largest |log10| coefficient of the coefficient form.
        coef_proxy_weight: the coefficient form's w_step: the weight of its penalty for leaving
            the proxy optimum (envs/coef_env.py).
        coef_anchor: what a coefficient action is relative to: 'best' (a move from the
            best-scoring action vector found so far at the budget, the calibrated DP plan's until
            a plan scores higher; neutral = repeat it) or 'dp' (the action is the coefficient;
            neutral = the calibrated DP plan). 'best' is the default since 2026-12-06: with the
            agent defaults below it is ahead of 'dp' at 64 evaluations on three of the four
            benchmark tasks and level on the fourth (docs/benchmarks.md §2).
    """

    budget_bits: float = 4.0
    budget_range: tuple[float, ...] = ()
    budget_step: float = 0.25
    budget_draw: str = "gap"
    groups: int = 8
    step_reward_weight: float = 1.0
    metric_reward_weight: float = 1.0
    layer_levels: int = 16
    prune_fractions: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5)
    metric_every: int = 8
    coef_levels: int = 9
    coef_span: float = 1.0
    coef_proxy_weight: float = 0.1
    coef_anchor: str = "best"

    def budgets(self) -> tuple[float, ...]:
        """The budgets episodes draw from: the grid of ``budget_range``, else ``budget_bits``."""
        if not self.budget_range:
            return (self.budget_bits,)
        lo, hi = self.budget_range
        n = int(round((hi - lo) / self.budget_step))
        grid = {round(lo + k * (hi - lo) / max(n, 1), 6) for k in range(n + 1)}
        return tuple(sorted(grid | {round(self.budget_bits, 6)}))

    def range_middle(self, lo: float, hi: float) -> float:
        """The budget a run over [lo, hi] writes its plan at when none is given.

        The middle of the range rounded to a multiple of ``budget_step``, clipped to the range.
        """
        mid = round((lo + hi) / 2 / self.budget_step) * self.budget_step
        return round(min(hi, max(lo, mid)), 6)

    def __post_init__(self) -> None:
        if self.coef_levels < 3 or self.coef_levels % 2 == 0:
            raise ConfigError(f"env.coef_levels must be odd and >= 3, found {self.coef_levels}")
        if self.coef_proxy_weight < 0:
            raise ConfigError(f"env.coef_proxy_weight must be >= 0, found "
                              f"{self.coef_proxy_weight}")
        if self.coef_anchor not in COEF_ANCHORS:
            raise ConfigError(f"env.coef_anchor must be one of {list(COEF_ANCHORS)}, found "
                              f"{self.coef_anchor!r}")
        if not 0.0 < self.coef_span <= 4.0:
            raise ConfigError(f"env.coef_span must be in (0, 4], found {self.coef_span}")
        r = self.budget_range
        if r and (len(r) != 2 or not 0.0 < r[0] < r[1] <= 32.0):
            raise ConfigError(f"env.budget_range must be empty or [low, high] with 0 < low < high, "
                              f"found {list(r)}")
        if r and not r[0] - 1e-9 <= self.budget_bits <= r[1] + 1e-9:
            raise ConfigError(f"env.budget_bits {self.budget_bits} is outside env.budget_range "
                              f"{list(r)}; the run's plan is for budget_bits")
        if self.budget_draw not in BUDGET_DRAWS:
            raise ConfigError(f"env.budget_draw must be one of {list(BUDGET_DRAWS)}, found "
                              f"{self.budget_draw!r}")
        if self.budget_step <= 0:
            raise ConfigError(f"env.budget_step must be > 0, found {self.budget_step}")
        if not 0.0 < self.budget_bits <= 32.0:
            raise ConfigError(f"env.budget_bits must be in (0, 32], found {self.budget_bits}")
        if self.groups < 1:
            raise ConfigError(f"env.groups must be >= 1, found {self.groups}")
        if self.step_reward_weight < 0 or self.metric_reward_weight < 0:
            raise ConfigError(
                "env.step_reward_weight and env.metric_reward_weight must be >= 0, found "
                f"{self.step_reward_weight} and {self.metric_reward_weight}"
            )
        if self.layer_levels < 2:
            raise ConfigError(f"env.layer_levels must be >= 2, found {self.layer_levels}")
        fr = self.prune_fractions
        if not fr or fr[0] != 0.0 or any(not 0.0 <= f < 1.0 for f in fr) or list(fr) != sorted(
            set(fr)
        ):
            raise ConfigError(
                "env.prune_fractions must be ascending, distinct, in [0, 1) and start with 0.0, "
                f"found {list(fr)}"
            )
        if self.metric_every < 1:
            raise ConfigError(f"env.metric_every must be >= 1, found {self.metric_every}")


@dataclass(frozen=True)
class AgentConfig:
    """The controllers (docs/env.md §4).

    Attributes:
        form: 'hierarchical' (two SB3 models trained in alternation), 'flat' (one MaskablePPO on
            the two-phase episode) or 'haq' (HAQ-style DDPG baseline).
        action: what the hierarchical controllers decide: 'budget' (a layer budget level,
            pattern and 0-bit fraction per layer, a bit-width per row group;
            envs/compression_env.py) or 'coefficient' (a log10 coefficient per layer and per row
            group that the exact DP over layers and knapsack within layers turn into the plan;
            envs/coef_env.py).
        layer_controller: 'learned' or 'dp' (the calibrated DP's layer budgets; with
            action='coefficient': coefficient 0).
        channel_controller: 'learned', 'knapsack' (exact per-row knapsack; with
            action='coefficient': multiplier 1) or 'uniform' (action='budget' only).
        metric_fraction: the share of the validation split each training episode is scored on
            (the final candidates are scored on all of it); 1 by default, so that an incumbent
            (``env.coef_anchor='best'``) is judged on the split the final plan is chosen on.
        neutral_prior: action='coefficient': the initial channel controller's logit bonus for
            the neutral coefficient (0), so that training starts around the anchor instead of
            uniformly random coefficients (4: about 87 % of the initial probability on "keep"
            with 9 levels).
        layer_moves: action='coefficient': the layer decisions the initial layer controller
            moves away from the anchor per episode on average, whatever the model's depth (its
            neutral bonus is set to give this; 1: one coefficient an episode, as SPDY's local
            search ends up moving); None gives the layer controller ``neutral_prior`` as well
            (the previous default: 4 at every depth).
        channel_moves: action='coefficient': the same for the channel controller, over all the
            episode's group decisions (every layer's groups); None (the default) gives it
            ``neutral_prior``, which moves 0.128 of the groups an episode (37 of minilm_l6's 288).
        warmup_episodes: action='coefficient' with a learned layer controller: episodes of
            uniformly random layer moves from the incumbent before a new run's training (SPDY's
            random starting vectors), each scored like any episode and kept as the incumbent
            when it scores higher; the controllers do not learn from them (they are not drawn
            from the policy). A fine-tune or a resumed run has none. 0 by default: 8 gave no
            gain at 64 evaluations (docs/benchmarks.md §2, "Random starts").
        total_steps: environment steps of training at most, all controllers together (training
            also ends when its evaluations are spent).
        n_steps: rollout length per PPO update.
        batch_size: PPO minibatch size.
        n_epochs: PPO epochs per update.
        learning_rate: optimiser step size.
        ent_coef: the PPO controllers' entropy bonus (SB3's ``ent_coef``). 0 by default: with
            the incumbent anchor only moves are ever paid, and a bonus pulls every decision
            toward the uniform policy: with 0.01, the earlier default, the layer controller's
            moves an episode went from 1 to 1.7–4.9 on user_model over 256 evaluations
            (docs/benchmarks.md §2, "The entropy bonus").
        normalize_advantage: standardise PPO's advantages within every minibatch (SB3's
            ``normalize_advantage``). None (the default): off for the coefficient form with
            the incumbent anchor, on (SB3's default) everywhere else. With the
            incumbent anchor most minibatches carry no reward, and standardising gives their
            advantages (the value estimates' residue) unit size, so that such an update moves the
            policy as far as a paid one; without it the default's test mean rose on minilm_l6 and
            user_model at 64 and 256 evaluations and fell by a few test images or frames over
            five seeds on digits and on crepe_tiny at 64 (level at 256; docs/benchmarks.md §2,
            "PPO's advantage standardisation").
        round_steps: steps one controller trains before the other takes its turn.
        checkpoint_every: steps between resumable checkpoints.
        final_candidates: deterministic rollouts of the final policy that are evaluated on the
            true metric (candidates for the best plan).
    """

    form: str = "hierarchical"
    action: str = "coefficient"
    layer_controller: str = "learned"
    channel_controller: str = "learned"
    total_steps: int = 16384
    n_steps: int = 128
    batch_size: int = 64
    n_epochs: int = 10
    learning_rate: float = 1e-3
    ent_coef: float = 0.0
    normalize_advantage: bool | None = None
    round_steps: int = 1024
    checkpoint_every: int = 1024
    final_candidates: int = 4
    metric_fraction: float = 1.0
    neutral_prior: float = 4.0
    layer_moves: float | None = 1.0
    channel_moves: float | None = None
    warmup_episodes: int = 0

    @property
    def coefficient_form(self) -> bool:
        """Whether the controllers are the hierarchy deciding DP coefficients (docs/env.md §1.1)."""
        return self.form == "hierarchical" and self.action == "coefficient"

    def __post_init__(self) -> None:
        choices = {
            "form": ("hierarchical", "flat", "haq"),
            "action": ("budget", "coefficient"),
            "layer_controller": ("learned", "dp"),
            "channel_controller": ("learned", "knapsack", "uniform"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"agent.{key} must be one of {list(allowed)}, found {getattr(self, key)!r}"
                )
        if self.layer_controller == "dp" and self.channel_controller != "learned":
            raise ConfigError(
                "agent.layer_controller='dp' with a non-learned channel controller leaves nothing "
                "to learn; use `automl-compress compress --method dp` or set one controller to "
                "'learned'"
            )
        for key in ("total_steps", "n_steps", "batch_size", "n_epochs", "round_steps",
                    "checkpoint_every", "final_candidates"):
            if getattr(self, key) < 1:
                raise ConfigError(f"agent.{key} must be >= 1, found {getattr(self, key)}")
        if self.action == "coefficient" and self.channel_controller == "uniform":
            raise ConfigError("agent.channel_controller='uniform' has no coefficient form; use "
                              "'learned' or 'knapsack' with agent.action='coefficient'")
        if not 0.0 < self.metric_fraction <= 1.0:
            raise ConfigError(f"agent.metric_fraction must be in (0, 1], found "
                              f"{self.metric_fraction}")
        if self.warmup_episodes < 0:
            raise ConfigError(f"agent.warmup_episodes must be >= 0, found "
                              f"{self.warmup_episodes}")
        for key in ("layer_moves", "channel_moves"):
            moves = getattr(self, key)
            if moves is not None and not moves > 0.0:
                raise ConfigError(f"agent.{key} must be > 0, found {moves}")
        if not 0.0 <= self.ent_coef < 1.0:
            raise ConfigError(f"agent.ent_coef must be in [0, 1), found {self.ent_coef}")
        if not 0.0 < self.learning_rate < 1.0:
            raise ConfigError(f"agent.learning_rate must be in (0, 1), found {self.learning_rate}")
