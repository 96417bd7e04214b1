"""Saving and loading policies: both SB3 zips plus a manifest (``RUN/policy/``, docs/env.md §6).

A policy can be applied to another model only when the observation and action spaces mean the
same thing there: the same feature-spec version, the same option menu (bits and patterns), the
same layer-action ladder (levels, 0-bit fractions) and the same number of importance groups. The
manifest records all of them (plus the normalisation, the model family it was trained on and the
algorithms); :func:`check_manifest` compares them with the current run and raises
:class:`~automl_compress.errors.PolicyMismatchError` naming every difference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from automl_compress.agents.controllers import ALGORITHMS
from automl_compress.config import Config
from automl_compress.envs import features
from automl_compress.errors import PolicyMismatchError
from automl_compress.io import atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def controller_names(cfg: Config) -> list[str]:
    """The learned models of a configuration ('layer_controller', 'channel_controller', ...)."""
    a = cfg.agent
    if a.form == "flat":
        return ["flat"]
    if a.form == "haq":
        return ["haq"]
    names = []
    if a.layer_controller == "learned":
        names.append("layer_controller")
    if a.channel_controller == "learned":
        names.append("channel_controller")
    return names


def spec_of(cfg: Config) -> dict[str, Any]:
    """The parts of a config that fix the meaning of the policy's spaces."""
    bits = sorted(int(b) for b in cfg.menu.bits)
    a = cfg.agent
    env = ({"groups": cfg.env.groups, "coef_levels": cfg.env.coef_levels,
            "coef_span": cfg.env.coef_span, "coef_anchor": cfg.env.coef_anchor}
           if a.coefficient_form else
           {"groups": cfg.env.groups, "layer_levels": cfg.env.layer_levels,
            "prune_fractions": list(cfg.env.prune_fractions)})
    layout = features.coef_layout if a.coefficient_form else features.budget_layout
    size = layout(bits, len(cfg.menu.patterns)).size
    return {
        "feature_version": features.FEATURE_VERSION,
        "menu": {"bits": bits, "patterns": list(cfg.menu.patterns)},
        "env": env,
        "controllers": {"form": a.form, "action": a.action,
                        "layer_controller": a.layer_controller,
                        "channel_controller": a.channel_controller},
        "normalisation": {
            "obs_size": size,
            "obs_clip": features.OBS_CLIP,
            "scaling": "fixed constants (automl_compress/envs/features.py); no running stats",
        },
    }


def manifest_of(cfg: Config, trained_steps: int) -> dict[str, Any]:
    """The full manifest written beside the zips."""
    names = controller_names(cfg)
    return {
        "version": MANIFEST_VERSION,
        **spec_of(cfg),
        "model_family": cfg.task.name,
        "budget_bits": cfg.env.budget_bits,
        "budget_range": list(cfg.env.budget_range),
        "budgets": list(cfg.env.budgets()),
        "eval": {"bias_correction": cfg.eval.bias_correction,
                 "bn_reestimate": cfg.eval.bn_reestimate},
        "objective": cfg.alloc.objective,
        "trained_steps": int(trained_steps),
        "algorithms": {n: ALGORITHMS[n] for n in names},
        "files": {n: f"{n}.zip" for n in names},
    }


def save_policy(policy_dir: str | Path, models: Mapping[str, Any], cfg: Config,
                trained_steps: int) -> None:
    """Write each model's zip and the manifest into ``policy_dir`` (manifest last, atomically)."""
    d = Path(policy_dir)
    d.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        tmp = d / f".{name}.tmp.zip"
        model.save(str(tmp))
        tmp.replace(d / f"{name}.zip")
    atomic_write_json(d / MANIFEST, manifest_of(cfg, trained_steps))


def read_manifest(policy_dir: str | Path) -> dict[str, Any]:
    """Read a policy folder's manifest.

    Raises:
        PolicyMismatchError: no readable manifest (not a policy folder).
    """
    p = Path(policy_dir) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyMismatchError(
            f"expected a policy folder with {MANIFEST} (written by `automl-compress train` into "
            f"RUN/policy), found none readable at {str(p)!r} ({exc}); pass --policy RUN of a "
            "finished or checkpointed train run"
        ) from None


def _diff(expected: Any, found: Any, where: str, out: list[str]) -> None:
    if isinstance(expected, dict) and isinstance(found, dict):
        for k in expected:
            _diff(expected[k], found.get(k), f"{where}.{k}" if where else k, out)
    elif expected != found:
        out.append(f"{where}: policy has {found!r}, this run has {expected!r}")


def check_manifest(manifest: Mapping[str, Any], cfg: Config) -> None:
    """Raise :class:`PolicyMismatchError` listing every difference that changes the spaces.

    The budget and the model family may differ (that is what transfer is for).
    """
    diffs: list[str] = []
    _diff(spec_of(cfg), dict(manifest), "", diffs)
    if diffs:
        raise PolicyMismatchError(
            "the saved policy does not fit this run: " + "; ".join(diffs) + ". Apply it with the "
            "same menu (menu.bits, menu.patterns), env.groups, env.layer_levels, "
            "env.prune_fractions and agent controllers it was trained with, or train a new one"
        )


def policy_folder(policy: str | Path) -> Path:
    """The policy folder of a train run directory (``RUN/policy``), or ``policy`` itself."""
    p = Path(policy)
    return p / "policy" if (p / "policy").is_dir() else p


def load_models(policy_dir: str | Path, names: list[str]) -> dict[str, Any]:
    """Load the SB3 zips of a policy folder (spaces are checked when they meet an env).

    Raises:
        PolicyMismatchError: a zip the manifest names is missing or unreadable.
    """
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import DDPG

    out = {}
    for n in names:
        path = Path(policy_dir) / f"{n}.zip"
        cls = DDPG if n == "haq" else MaskablePPO
        try:
            out[n] = cls.load(str(path), device="cpu")
        except (OSError, ValueError, KeyError) as exc:
            raise PolicyMismatchError(
                f"expected a readable {cls.__name__} model at {str(path)!r}, found an error "
                f"({exc}); re-run `automl-compress train` to write the policy"
            ) from None
    return out
