"""SB3 callbacks of the search: the shared step counter, the progress bar and checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from stable_baselines3.common.callbacks import BaseCallback


class Progress:
    """Steps across every controller of a search, with an optional tqdm bar.

    Args:
        total: the steps the search will run.
        done: steps already done (on resume).
        show: draw a tqdm bar (steps, best metric so far, time left).
    """

    def __init__(self, total: int, done: int = 0, show: bool = False) -> None:
        self.total, self.steps = int(total), int(done)
        self.bar = None
        self.t0 = time.perf_counter()
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.steps, unit="step", desc="train",
                            dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more steps (and move the bar)."""
        self.steps += n
        if self.bar is not None:
            self.bar.update(n)

    def best(self, metric: float) -> None:
        """Show ``metric`` as the best so far on the bar (when finite)."""
        if self.bar is not None and math.isfinite(metric):
            self.bar.set_postfix(best=f"{metric:.4f}", refresh=False)

    def close(self) -> None:
        """Close the progress bar, if one is drawn."""
        if self.bar is not None:
            self.bar.close()


class StepCallback(BaseCallback):
    """Counts env steps into a :class:`Progress` and checkpoints every ``every`` steps.

    It ends training when ``stop()`` says so (the evaluation budget is spent).

    Args:
        progress: the shared counter.
        every: steps between checkpoints.
        checkpoint: called to write a checkpoint (None: no checkpoints).
        stop: ``() -> bool``, checked after every step (None: never).
    """

    def __init__(self, progress: Progress, every: int,
                 checkpoint: Callable[[], None] | None = None,
                 stop: Callable[[], bool] | None = None) -> None:
        super().__init__(verbose=0)
        self.progress, self.every, self.checkpoint = progress, int(every), checkpoint
        self.stop = stop

    def _on_step(self) -> bool:
        n = int(self.training_env.num_envs) if self.training_env is not None else 1
        before = self.progress.steps
        self.progress.advance(n)
        if self.checkpoint is not None and before // self.every != self.progress.steps // \
                self.every:
            self.checkpoint()
        return not (self.stop is not None and self.stop())
