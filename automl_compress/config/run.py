"""Where a run executes (:class:`ExecutorConfig`) and the whole-run :class:`Config`.

:class:`Config` composes one instance of every section (automl_compress/config/compression.py,
automl_compress/config/training.py, :class:`ExecutorConfig` here) with the run's seed and device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from automl_compress.config.compression import (
    AllocConfig,
    CaptureConfig,
    CostConfig,
    EvalConfig,
    MenuConfig,
    SolverConfig,
    TaskConfig,
)
from automl_compress.config.training import AgentConfig, EnvConfig
from automl_compress.errors import ConfigError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the layer solves and the plan evaluations run.

    See automl_compress/executors.py and docs/distributed.md.

    Attributes:
        kind: 'local' (this process, serially: no Ray import) or 'ray' (Ray tasks for the
            database's (layer, option) solves, a pool of evaluation actors for the searches;
            needs ``pip install "automl-compress[distributed]"``).
        address: the Ray cluster: null starts a local Ray on this machine with ``workers`` CPUs;
            'auto' joins the cluster this machine belongs to; 'ray://HOST:10001' a remote
            cluster through Ray Client.
        workers: evaluation actors (each holds the model once) and, with a local Ray, its CPUs.
        num_cpus: CPUs each solve task and each evaluation actor asks for.
        num_gpus: GPUs each solve task and each evaluation actor asks for; null (the default):
            1 when the run's device is cuda (or auto on a cluster that has GPUs), else 0; a
            fraction such as 0.5 shares a GPU between two tasks.
        max_retries: how many times a solve task or an evaluation is resubmitted after its worker
            dies (each failure is reported); a solver error is not retried.
    """

    kind: str = "local"
    address: str | None = None
    workers: int = 2
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(
                f"executor.kind must be one of {list(EXECUTORS)}, found {self.kind!r}"
            )
        if self.workers < 1:
            raise ConfigError(f"executor.workers must be >= 1, found {self.workers}")
        if self.num_cpus <= 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ConfigError(
                "executor.num_cpus must be > 0 and executor.num_gpus >= 0 (or null), found "
                f"{self.num_cpus} and {self.num_gpus}"
            )
        if self.max_retries < 0:
            raise ConfigError(f"executor.max_retries must be >= 0, found {self.max_retries}")


@dataclass(frozen=True)
class Config:
    """The whole run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    menu: MenuConfig = field(default_factory=MenuConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    alloc: AllocConfig = field(default_factory=AllocConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', found {self.device!r}")
