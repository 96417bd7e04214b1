"""Named exceptions.

Every error raised on bad input says what was expected, what was found and what to do. All of them
derive from :class:`AutoMLCompressError`, so a caller can catch the whole family at once; the input
errors also derive from :class:`ValueError` for callers that expect the builtin.
"""

from __future__ import annotations


class AutoMLCompressError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(AutoMLCompressError, ValueError):
    """An argument has the wrong value, shape or type."""


class NonFiniteError(InvalidInputError):
    """A weight, Hessian or activation tensor holds NaN or Inf."""


class ShapeMismatchError(InvalidInputError):
    """Two tensors that must agree in shape do not."""


class BitsOutOfRangeError(InvalidInputError):
    """A bit-width outside the supported range (0 = row removed, else 2..8)."""


class SparsityOutOfRangeError(InvalidInputError):
    """A sparsity outside [0, 1)."""


class NMPatternError(InvalidInputError):
    """An N:M pattern that does not fit the layer (e.g. cols % M != 0, or N >= M)."""


class HessianNotPSDError(AutoMLCompressError):
    """The Hessian is not positive definite even after damping."""


class UnsupportedLayerError(AutoMLCompressError):
    """A module type or layer configuration that the solvers cannot handle."""


class ConfigError(AutoMLCompressError, ValueError):
    """A config file or override that does not match the schema."""


class InfeasibleBudgetError(AutoMLCompressError, ValueError):
    """A size budget below the smallest feasible one.

    Attributes:
        budget: the requested budget in average bits per compressible weight.
        minimum: the smallest budget any plan can meet with the configured option menu.
    """

    def __init__(self, budget: float, minimum: float, detail: str = "") -> None:
        self.budget = float(budget)
        self.minimum = float(minimum)
        msg = (
            f"budget of {self.budget:.4g} avg bits is infeasible: the smallest feasible budget "
            f"with this option menu is {self.minimum:.4g} avg bits; raise --budget-bits to at "
            f"least {self.minimum:.4g} or add lower options (e.g. 0 or 2 bits) to the menu"
        )
        super().__init__(msg + (f" ({detail})" if detail else ""))


class DatabaseMismatchError(AutoMLCompressError):
    """A layer database that was built for another model, calibration set, menu or solver.

    ``differences`` names each one (``"menu: database has ..., this run needs ..."``).
    """

    def __init__(self, msg: str, differences: tuple[str, ...] = ()) -> None:
        self.differences = differences
        super().__init__(msg)


class CorruptCacheError(AutoMLCompressError):
    """A cache or database file that cannot be read back."""


class PolicyMismatchError(AutoMLCompressError):
    """A saved policy whose feature spec or option menu does not fit the current run."""


class ObjectiveError(AutoMLCompressError):
    """A calibrated objective that cannot be computed for this model.

    E.g. outputs that are not tensors, a forward that disables gradients, non-finite sensitivities.
    """


class TaskError(AutoMLCompressError):
    """A task (model, data, metric) that cannot be built, e.g. a missing optional package."""


class ExecutorError(AutoMLCompressError):
    """An executor that cannot run (docs/distributed.md).

    Ray not installed, a cluster that cannot be reached, or a task whose workers kept dying after
    every retry.
    """
