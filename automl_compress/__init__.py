"""automl-compress: post-training compression with exact layer solvers and RL allocation."""

__version__ = "0.1.0"
