"""Gymnasium environments over the layer database (docs/env.md); they never run solvers."""

from automl_compress.envs.compression_env import MODES, CompressionEnv
from automl_compress.envs.episode import EpisodeSummary
from automl_compress.envs.features import FEATURE_VERSION, obs_size

__all__ = ["FEATURE_VERSION", "MODES", "CompressionEnv", "EpisodeSummary", "obs_size"]
