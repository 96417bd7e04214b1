"""The config sections of the compression itself: task, capture, menu, solver, cost, alloc, eval.

Each is a typed, frozen dataclass that holds its defaults and validates itself in
``__post_init__`` (a :class:`~automl_compress.errors.ConfigError` naming the key). They say what
is compressed (:class:`TaskConfig`, :class:`CaptureConfig`), which options each layer is solved at
and how (:class:`MenuConfig`, :class:`SolverConfig`), how sizes are counted
(:class:`CostConfig`), what the allocators minimise and how the searches spend evaluations
(:class:`AllocConfig`), and how a stitched model is corrected and scored (:class:`EvalConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        quant: 'obq' (exact greedy), 'gptq' (fixed order), or 'fast' (OBQ's greedy on a sliding
            window of GPTQ's column order, 1-opt); every option uses it, sparse ones on their
            kept weights.
        prune: 'exact_obs' (exact greedy), 'sparsegpt' (fixed order; with quant 'gptq' one
            joint prune + quantize pass) or 'chita' (ExactOBS's mask refined by swaps).
        symmetric: symmetric per-row grid (else asymmetric).
        grid_search: 'mse' shrink search or 'minmax'.
        damp: relative damping (fraction of mean diag H).
        row_batch: rows per batch (None: sized to the device).
        exact_max_s: with quant 'obq', layer pieces whose estimated one-core OBQ time exceeds
            this many seconds use the fast mode instead (None: always OBQ).
        polish: 1-opt after the quantization solver (never raises a row's error; OBQ's codes
            then differ from the paper's greedy in the rows it improves).
        fast_carry: the fast mode's window: unfixed weights a row carries past a block of 16
            columns (docs/solvers.md §7). More is closer to OBQ for (16 + carry)² work a step.
    """

    quant: str = "obq"
    prune: str = "exact_obs"
    symmetric: bool = True
    grid_search: str = "mse"
    damp: float = 0.01
    row_batch: int | None = None
    exact_max_s: float | None = None
    polish: bool = True
    fast_carry: int = 16

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
        if isinstance(self.fast_carry, bool) or not isinstance(self.fast_carry, int) \
                or self.fast_carry < 0:
            raise ConfigError(
                f"solver.fast_carry must be an int >= 0 (weights a row carries past a block), "
                f"found {self.fast_carry!r}"
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
            or 'loss'; 'auto' (default) chooses among ``auto_objectives`` on the validation split
            together with the statistics corrections (the DP plan of each at the run's budget
            is scored; the choice's evaluations are counted; automl_compress/selection.py).
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

    objective: str = "auto"
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
#: How ``eval.corrections`` chooses: on validation, on calibration fidelity, or not at all.
CORRECTION_CHOICES = ("auto", "calibration", "fixed")
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
            above; the evaluations are counted); 'calibration': the same comparison by the
            outputs' fidelity to the dense model on the calibration batches (no labels, no
            validation evaluations; a zero-shot ``apply`` on another model uses it);
            'fixed': use the values above.
    """

    bn_reestimate: str = "relative"
    bias_correction: bool = True
    corrections: str = "auto"

    def __post_init__(self) -> None:
        if self.corrections not in CORRECTION_CHOICES:
            raise ConfigError(f"eval.corrections must be one of {list(CORRECTION_CHOICES)}, "
                              f"found {self.corrections!r}")
        mode = str(self.bn_reestimate).strip().lower()
        mode = BN_SWITCHES.get(mode, mode)
        if mode not in BN_MODES:
            raise ConfigError(
                f"eval.bn_reestimate must be one of {list(BN_MODES)} (or on/off), found "
                f"{self.bn_reestimate!r}"
            )
        object.__setattr__(self, "bn_reestimate", mode)
