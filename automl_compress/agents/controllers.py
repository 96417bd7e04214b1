"""The SB3 models behind the controllers, and frozen-policy adapters for the envs.

Algorithms (no RL maths here, SB3 does it):

- Layer controller: sb3-contrib ``MaskablePPO`` on ``Discrete(patterns × fractions × levels)``.
  The budget constraint is a mask over that set, so a masked discrete policy never proposes an
  infeasible layer budget; SAC/TD3 would need a continuous action and a projection every step.
- Channel controller: ``MaskablePPO`` on ``Discrete(len(menu.bits))`` per importance group, the
  masks recomputed after every group (the joint layer budget is not per-sub-action separable, so
  a MultiDiscrete over K groups could not be masked correctly).
- HAQ-style baseline: SB3 ``DDPG`` with one continuous action per layer (``envs/haq_env.py``).

``gamma = 1``: episodes are short and finite, and the return is exactly the plan's quality.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from automl_compress.config import AgentConfig, Config

ALGORITHMS = {"layer_controller": "MaskablePPO", "channel_controller": "MaskablePPO",
              "flat": "MaskablePPO", "haq": "DDPG"}
NET_ARCH = (64, 64)


def normalizes_advantage(cfg: Config) -> bool:
    """Whether the PPO controllers standardise their advantages (``agent.normalize_advantage``).

    Unset, off where the rewards are the incumbent's rare improvements (the coefficient form with
    ``env.coef_anchor='best'``), on (SB3's default) elsewhere.
    """
    a = cfg.agent
    if a.normalize_advantage is not None:
        return a.normalize_advantage
    return not (a.coefficient_form and cfg.env.coef_anchor == "best")


def make_ppo(env: Any, cfg: Config, seed: int):
    """A MaskablePPO model on ``env`` with the configured hyper-parameters (CPU)."""
    from sb3_contrib import MaskablePPO

    acfg = cfg.agent
    return MaskablePPO(
        "MlpPolicy", env, n_steps=acfg.n_steps, batch_size=acfg.batch_size,
        n_epochs=acfg.n_epochs, learning_rate=acfg.learning_rate, gamma=1.0, gae_lambda=0.95,
        ent_coef=acfg.ent_coef, normalize_advantage=normalizes_advantage(cfg), seed=seed,
        verbose=0, device="cpu", policy_kwargs={"net_arch": list(NET_ARCH)},
    )


def moves_bonus(decisions: int, levels: int, moves: float) -> float:
    """The neutral action's logit bonus under which ``moves`` of ``decisions`` move on average.

    With every other logit equal, a decision leaves the neutral action with probability
    ``p = (levels − 1) / (levels − 1 + e^b)``; ``decisions · p = moves`` gives
    ``b = ln((levels − 1)(decisions / moves − 1))``. The bonus is never below 0 (the uniform
    policy), so asking for more moves than it makes gives 0.
    """
    if decisions < 1 or levels < 2 or moves <= 0:
        raise ValueError(f"need decisions >= 1, levels >= 2 and moves > 0, found {decisions}, "
                         f"{levels}, {moves}")
    return math.log(max(1.0, (levels - 1) * (decisions / moves - 1.0)))


def favour_action(model: Any, action: int, bonus: float) -> None:
    """Add ``bonus`` to the initial logit of ``action`` (a new model starts near that action)."""
    import torch

    with torch.no_grad():
        model.policy.action_net.bias[action] += float(bonus)


class PolicyRef:
    """A frozen view of a model for use inside another controller's env.

    Calling it gives the model's deterministic, masked action; ``model`` can be set after the env
    is built (the two controllers' envs refer to each other's models).
    """

    def __init__(self, model: Any = None) -> None:
        self.model = model

    def __call__(self, obs: np.ndarray, mask: np.ndarray) -> int:
        """The model's deterministic masked action (the cheapest allowed one before it exists)."""
        if self.model is None:  # before the model exists: the cheapest allowed action
            return int(np.flatnonzero(mask)[0])
        action, _ = self.model.predict(obs, action_masks=mask, deterministic=True)
        return int(np.asarray(action).reshape(-1)[0])


def make_ddpg(env: Any, acfg: AgentConfig, seed: int):
    """SB3 DDPG with Gaussian exploration noise (σ = 0.1 of the action range)."""
    from stable_baselines3 import DDPG
    from stable_baselines3.common.noise import NormalActionNoise

    noise = NormalActionNoise(np.zeros(1), 0.1 * np.ones(1))
    return DDPG("MlpPolicy", env, action_noise=noise, learning_rate=acfg.learning_rate,
                learning_starts=min(100, acfg.total_steps // 4), batch_size=acfg.batch_size,
                gamma=1.0, seed=seed, verbose=0, device="cpu",
                policy_kwargs={"net_arch": list(NET_ARCH)})
