"""The controllers: SB3 models, the orchestrator, TensorBoard callbacks, save/load (docs/env.md §4).

``run`` holds the ``train`` / ``apply`` entry points; import it explicitly (it pulls in the
pipeline and torch).
"""

from automl_compress.agents.hierarchical import Search
from automl_compress.agents.tracking import MetricOracle, Tracker
from automl_compress.agents.transfer import check_manifest, read_manifest, save_policy

__all__ = ["MetricOracle", "Search", "Tracker", "check_manifest", "read_manifest", "save_policy"]
