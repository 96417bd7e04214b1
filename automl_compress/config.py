"""Typed, frozen, self-validating configuration.

The dataclasses below are the schema and hold every default; YAML files hold only overrides, and
``--set section.key=value`` overrides those. Unknown keys are errors that name the closest valid
key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from automl_compress.errors import ConfigError
from automl_compress.solvers.registry import PruneSolver, QuantSolver
from automl_compress.specs import Pattern

PATTERNS = ("dense", "2:4", "50%", "75%")


def parse_pattern(p: str) -> tuple[str, float | tuple[int, int] | None]:
    """Parse a layer pattern (the tuple form of :meth:`automl_compress.specs.Pattern.parse`).

    ``"dense"`` → ("dense", None); ``"2:4"`` → ("nm", (2, 4)); ``"50%"`` → ("unstructured", 0.5).
    """
    pattern = Pattern.parse(p)
    return pattern.kind, pattern.arg


@dataclass(frozen=True)
class TaskConfig:
    """What to compress: a built-in zoo key, the user's factory, or a local Hugging Face folder.

    Attributes:
        name: zoo key (``digits_cnn``, ``digits_cnn_wide``, ``crepe_tiny``, ``crepe_full``,
            ``minilm_l6``); ``package.module:function`` returning a Task (or, with ``inputs``,
            returning the model); or ``hf:PATH``, a local transformers encoder folder
            (``options.text_file``: one input text per line).
        options: keyword arguments passed to the factory.
        cache_dir: where tasks cache trained weights (default: ``~/.cache/automl-compress``).
        inputs: ``package.module:function`` returning a list of input batches: then ``name``
            is a model factory and the splits and the fidelity metric are made for it
            (automl_compress/zoo/generic.py).
        inputs_options: keyword arguments passed to the inputs factory.
        distance: the output distance ('kl', 'cosine', 'mse'); empty: the task's own (a model
            and inputs alone: 'mse').
    """

    name: str = "digits_cnn"
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    inputs: str | None = None
    inputs_options: dict[str, Any] = field(default_factory=dict)
    distance: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("task.name must be a zoo key or 'package.module:function', found ''")
        if self.distance not in ("", "kl", "cosine", "mse"):
            raise ConfigError(f"task.distance must be 'kl', 'cosine', 'mse' or empty, found "
                              f"{self.distance!r}")


@dataclass(frozen=True)
class CaptureConfig:
    """Which layers are compressed and how their Hessians are collected.

    Attributes:
        include: glob patterns of module names to compress.
        exclude: glob patterns of module names to leave dense.
        max_dense_cols: above this many columns H is block-diagonal over column blocks.
        block_cols: the column-block size of the block-diagonal fallback.
        centered: centred H with bias folding (docs/solvers.md §1).
        max_batches: cap on calibration batches (None = all).
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    max_dense_cols: int = 16384
    block_cols: int = 4096
    centered: bool = False
    max_batches: int | None = None

    def __post_init__(self) -> None:
        if self.max_dense_cols < 1 or self.block_cols < 1:
            raise ConfigError(
                f"capture.max_dense_cols and capture.block_cols must be >= 1, found "
                f"{self.max_dense_cols} and {self.block_cols}"
            )


@dataclass(frozen=True)
class MenuConfig:
    """The option menu: per-row bit-widths x layer sparsity patterns (docs/allocation.md §1).

    Attributes:
        bits: per-row bit-widths; 0 removes the output channel.
        patterns: layer patterns: 'dense', 'N:M', or 'P%' unstructured.
    """

    bits: tuple[int, ...] = (0, 2, 3, 4, 6, 8)
    patterns: tuple[str, ...] = PATTERNS

    def __post_init__(self) -> None:
        if not self.bits:
            raise ConfigError("menu.bits must list at least one bit-width, found []")
        for b in self.bits:
            if not (b == 0 or 2 <= int(b) <= 8):
                raise ConfigError(f"menu.bits entries must be 0 or 2..8, found {b}")
        if len(set(self.bits)) != len(self.bits):
            raise ConfigError(f"menu.bits has duplicates: {list(self.bits)}")
        if "dense" not in self.patterns:
            raise ConfigError(f"menu.patterns must include 'dense', found {list(self.patterns)}")
        for p in self.patterns:
            parse_pattern(p)


@dataclass(frozen=True)
class SolverConfig:
    """How layers are solved (the registry: automl_compress/solvers/registry.py).

    Attributes:
        quant: 'obq' (exact greedy), 'gptq' (fixed order), or 'fast' (GPTQ candidates +
            refinement); every option uses it, sparse ones on their kept weights.
        prune: 'exact_obs' (exact greedy), 'sparsegpt' (fixed order; with quant 'gptq' one
            joint prune + quantize pass) or 'chita' (ExactOBS's mask refined by swaps).
        symmetric: symmetric per-row grid (else asymmetric).
        grid_search: 'mse' shrink search or 'minmax'.
        damp: relative damping (fraction of mean diag H).
        row_batch: rows per batch (None: sized to the device).
        exact_max_s: with quant 'obq', layer pieces whose estimated one-core OBQ time exceeds
            this many seconds use the fast mode instead (None: always OBQ).
    """

    quant: str = "obq"
    prune: str = "exact_obs"
    symmetric: bool = True
    grid_search: str = "mse"
    damp: float = 0.01
    row_batch: int | None = None
    exact_max_s: float | None = None

    def __post_init__(self) -> None:
        for key, names in (("quant", QuantSolver), ("prune", PruneSolver)):
            if getattr(self, key) not in set(names):
                allowed = ", ".join(repr(str(n)) for n in names)
                raise ConfigError(
                    f"solver.{key} must be one of {allowed}, found {getattr(self, key)!r}"
                )
        if self.grid_search not in ("mse", "minmax"):
            raise ConfigError(
                f"solver.grid_search must be 'mse' or 'minmax', found {self.grid_search!r}"
            )
        if not 0.0 <= self.damp < 10.0:
            raise ConfigError(f"solver.damp must be in [0, 10), found {self.damp}")
        if self.row_batch is not None and self.row_batch < 1:
            raise ConfigError(f"solver.row_batch must be null or >= 1, found {self.row_batch}")
        if self.exact_max_s is not None and self.exact_max_s <= 0:
            raise ConfigError(
                f"solver.exact_max_s must be null or > 0 seconds, found {self.exact_max_s}"
            )


@dataclass(frozen=True)
class CostConfig:
    """Size accounting (docs/allocation.md §1).

    Attributes:
        scale_bits: bits per per-row scale.
        zero_bits: bits per per-row zero point.
    """

    scale_bits: int = 16
    zero_bits: int = 16


OBJECTIVES = ("raw", "normalized", "fisher", "loss")
# alloc.objective = auto: the candidate whose DP plan scores best on the validation split
AUTO = "auto"


@dataclass(frozen=True)
class AllocConfig:
    """What the allocators optimise and how the true-metric searches spend their evaluations.

    Attributes:
        objective: the calibrated objective every allocator and the env's step reward minimise
            (automl_compress/objectives.py, docs/objectives.md): 'raw', 'normalized', 'fisher'
            or 'loss'; 'auto' chooses among ``auto_objectives`` on the validation split (the DP
            plan of each at the run's budget is scored; the choice's evaluations are counted).
        auto_objectives: 'auto': the candidates, in order of preference on ties.
        fisher_probes: 'fisher': random probes back-propagated per calibration batch.
        loss_batches: 'loss': calibration batches each layer × option is measured on.
        evaluations: the validation passes (full-pass equivalents) the searches 'evo', 'spdy'
            and ``train`` may spend unless ``--evaluations`` says otherwise.
        offspring: 'evo': candidates per generation (λ of the (1+λ) search).
        stages: 'evo': the validation fractions of multi-stage selection; every offspring is
            scored on the first, the best half of them on the next, ..., the last is 1.0.
        spdy_inits: 'spdy': random coefficient vectors tried before the local search.
        spdy_batch: 'spdy': candidate coefficient vectors of the local search scored together
            (one batch: in parallel with ``executor.kind=ray``); 1 is the sequential search.
            The result depends on this number, never on the executor.
    """

    objective: str = "normalized"
    auto_objectives: tuple[str, ...] = ("normalized", "fisher")
    fisher_probes: int = 4
    loss_batches: int = 2
    evaluations: int = 64
    offspring: int = 8
    stages: tuple[float, ...] = (0.25, 0.5, 1.0)
    spdy_inits: int = 8
    spdy_batch: int = 1

    def __post_init__(self) -> None:
        if self.objective not in (*OBJECTIVES, AUTO):
            raise ConfigError(f"alloc.objective must be one of {[*OBJECTIVES, AUTO]}, found "
                              f"{self.objective!r}")
        bad = [o for o in self.auto_objectives if o not in OBJECTIVES]
        if not self.auto_objectives or bad:
            raise ConfigError(f"alloc.auto_objectives must be a non-empty list of "
                              f"{list(OBJECTIVES)}, found {list(self.auto_objectives)}")
        for key in ("fisher_probes", "loss_batches", "evaluations", "offspring", "spdy_inits",
                    "spdy_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"alloc.{key} must be >= 1, found {getattr(self, key)}")
        st = self.stages
        if not st or list(st) != sorted(st) or st[-1] != 1.0 or any(not 0 < f <= 1 for f in st):
            raise ConfigError(
                f"alloc.stages must be ascending fractions in (0, 1] ending at 1.0, found "
                f"{list(st)}"
            )


BN_MODES = ("relative", "reset", "off")
# the words YAML reads as booleans, as values of eval.bn_reestimate: on = the default mode
BN_SWITCHES = {"on": "relative", "true": "relative", "yes": "relative",
               "off": "off", "false": "off", "no": "off"}


@dataclass(frozen=True)
class EvalConfig:
    """Stitched-model evaluation.

    Attributes:
        bn_reestimate: BatchNorm statistics after compression: 'relative' (move the pretrained
            statistics by the shift compression causes on the calibration data), 'reset'
            (re-estimate them from the calibration data alone) or 'off'; see
            automl_compress/evaluate.py. The switch words on/true/yes mean 'relative' and
            off/false/no mean 'off', quoted or not.
        bias_correction: fold ``(W − Ŵ)μ`` into biases.
        corrections: 'auto': every run compares bias correction on/off × the BN modes on the
            validation split with its starting plan and keeps the best (ties keep the values
            above; the evaluations are counted); 'fixed': use the values above.
    """

    bn_reestimate: str = "relative"
    bias_correction: bool = True
    corrections: str = "auto"

    def __post_init__(self) -> None:
        if self.corrections not in ("auto", "fixed"):
            raise ConfigError(
                f"eval.corrections must be 'auto' or 'fixed', found {self.corrections!r}"
            )
        mode = str(self.bn_reestimate).strip().lower()
        mode = BN_SWITCHES.get(mode, mode)
        if mode not in BN_MODES:
            raise ConfigError(
                f"eval.bn_reestimate must be one of {list(BN_MODES)} (or on/off), found "
                f"{self.bn_reestimate!r}"
            )
        object.__setattr__(self, "bn_reestimate", mode)


@dataclass(frozen=True)
class EnvConfig:
    """The compression environment (docs/env.md; formula in automl_compress/envs/rewards.py).

    Attributes:
        budget_bits: the budget in average bits per compressible weight (metadata included).
        budget_range: () or (low, high): train one policy for every budget of the grid from low
            to high in steps of ``budget_step`` (the observation carries the budget); the run's
            plan is for ``budget_bits``, which must lie in the range.
        budget_step: the grid step of ``budget_range``.
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
    """

    budget_bits: float = 4.0
    budget_range: tuple[float, ...] = ()
    budget_step: float = 0.25
    groups: int = 8
    step_reward_weight: float = 1.0
    metric_reward_weight: float = 1.0
    layer_levels: int = 16
    prune_fractions: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5)
    metric_every: int = 8
    coef_levels: int = 9
    coef_span: float = 1.0
    coef_proxy_weight: float = 0.1

    def budgets(self) -> tuple[float, ...]:
        """The budgets episodes draw from: the grid of ``budget_range``, else ``budget_bits``."""
        if not self.budget_range:
            return (self.budget_bits,)
        lo, hi = self.budget_range
        n = int(round((hi - lo) / self.budget_step))
        grid = {round(lo + k * (hi - lo) / max(n, 1), 6) for k in range(n + 1)}
        return tuple(sorted(grid | {round(self.budget_bits, 6)}))

    def __post_init__(self) -> None:
        if self.coef_levels < 3 or self.coef_levels % 2 == 0:
            raise ConfigError(f"env.coef_levels must be odd and >= 3, found {self.coef_levels}")
        if self.coef_proxy_weight < 0:
            raise ConfigError(f"env.coef_proxy_weight must be >= 0, found "
                              f"{self.coef_proxy_weight}")
        if not 0.0 < self.coef_span <= 4.0:
            raise ConfigError(f"env.coef_span must be in (0, 4], found {self.coef_span}")
        r = self.budget_range
        if r and (len(r) != 2 or not 0.0 < r[0] < r[1] <= 32.0):
            raise ConfigError(f"env.budget_range must be empty or [low, high] with 0 < low < high, "
                              f"found {list(r)}")
        if r and not r[0] - 1e-9 <= self.budget_bits <= r[1] + 1e-9:
            raise ConfigError(f"env.budget_bits {self.budget_bits} is outside env.budget_range "
                              f"{list(r)}; the run's plan is for budget_bits")
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
            (the final candidates are scored on all of it).
        neutral_prior: action='coefficient': the initial policies' logit bonus for the neutral
            coefficient (0), so that training starts around the calibrated DP plan instead of
            uniformly random coefficients.
        total_steps: environment steps of training at most, all controllers together (training
            also ends when its evaluations are spent).
        n_steps: rollout length per PPO update.
        batch_size: PPO minibatch size.
        n_epochs: PPO epochs per update.
        learning_rate: optimiser step size.
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
    round_steps: int = 1024
    checkpoint_every: int = 1024
    final_candidates: int = 4
    metric_fraction: float = 0.5
    neutral_prior: float = 2.0

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
        if not 0.0 < self.learning_rate < 1.0:
            raise ConfigError(f"agent.learning_rate must be in (0, 1), found {self.learning_rate}")


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the layer solves and the plan evaluations run (automl_compress/executors.py,
    docs/distributed.md).

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


# ---------------------------------------------------------------------------------------------
# Loading


# YAML 1.1 (PyYAML) reads these words as booleans; a string field gets the switch word back
_YAML_TRUE = ("true", "on", "yes")
_YAML_FALSE = ("false", "off", "no")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML value to the field type ``tp`` (``where`` names the key).

    YAML reads ``on/off/yes/no/true/false`` as booleans, so a string field that receives a
    boolean gets ``'on'`` or ``'off'`` back, and the field's own validation maps those words onto
    its choices (e.g. ``eval.bn_reestimate: off``); a boolean field accepts the same words
    written as strings.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, args[0], where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, found {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _YAML_TRUE + _YAML_FALSE:
            return value.strip().lower() in _YAML_TRUE
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where} must be true or false (or on/off, yes/no), found {value!r}"
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, found {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, found {value!r}")
        return str(value)
    return value


def _build(cls: type, data: Any, where: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a config: defaults, then the YAML file, then ``key.sub=value`` overrides.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or invalid values.
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, found {loaded!r}")
        tree = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, found {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _build(Config, tree)


def config_to_dict(cfg: Any) -> Any:
    """Plain-YAML form of a config (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
