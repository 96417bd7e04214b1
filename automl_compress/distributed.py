"""The Ray executor (``executor.kind: ray``, ``--executor ray``; docs/distributed.md).

Imported only when a run asks for Ray (:func:`automl_compress.executors.get_executor`).

**Database build** (:meth:`RayExecutor.solve_layers`). The driver captures the Hessians as the
serial build does, then, layer by layer in forward order, puts each (row group, column block)
piece's weights and Hessian into the object store once and submits one Ray task per unit
(:func:`~automl_compress.database.work.layer_units`: a piece at one pattern, with the
bit-widths that share its pruning pass). Each task asks for ``executor.num_cpus`` CPUs and
:meth:`RayExecutor.num_gpus` GPUs (1 on CUDA runs unless ``executor.num_gpus`` says) and runs the
same
:func:`~automl_compress.database.solve_unit` as the serial loop. When every unit of a layer
is back, the driver assembles the layer (:func:`~automl_compress.database.solve.assemble_layer`:
the exact errors under the captured H) and writes it through the atomic, resumable store, so a
killed driver (or cluster) resumes with the unwritten layers only. Layers are opened while fewer
than twice as many tasks as the cluster has slots are in flight, so the object store holds a few
layers' Hessians, not the model's. A task whose worker dies (crash, OOM kill, lost node) is
resubmitted up to ``executor.max_retries`` times, each failure reported as a
:class:`WorkerFailure` warning; an error raised by the solver itself is not retried.

**Evaluations** (:meth:`RayExecutor.scorer`). ``executor.workers`` actors each receive the
prepared task (model, database layers, dense statistics) once, through the object store, and
score ``(plan, fraction, eval_cfg)`` items with the same
:func:`~automl_compress.pipeline.validate_plan` as the local path. Batches of new plans
(:meth:`~automl_compress.search.evaluator.Evaluator.many`) go to them and single scores stay in the
driver; both run the same code on the same inputs, so a value does not depend on where its plan
was scored. Actors that die are
restarted by Ray (``max_restarts``, ``max_task_retries``) up to ``executor.max_retries`` times.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.util import ActorPool

from automl_compress.config import EvalConfig, ExecutorConfig, SolverConfig
from automl_compress.database.solve import assemble_layer, solve_unit
from automl_compress.database.store import LayerSolutions
from automl_compress.database.work import LayerWork, Unit, layer_units
from automl_compress.errors import ExecutorError
from automl_compress.plan import CompressionPlan


class WorkerFailure(UserWarning):
    """A Ray worker died while solving or scoring; the work was resubmitted."""


def connect(cfg: ExecutorConfig) -> bool:
    """Join the configured Ray cluster (or start a local one); True if this call started it.

    An already initialised Ray (``ray.init`` called by the user or a test) is used as it is.

    Raises:
        ExecutorError: the cluster at ``executor.address`` cannot be reached.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {}
    if cfg.address is None:  # a local Ray of our own: no dashboard, ``workers`` slots
        kwargs = {"include_dashboard": False,
                  "num_cpus": max(1, int(round(cfg.workers * max(cfg.num_cpus, 1.0))))}
    try:
        ray.init(address=cfg.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ExecutorError(
            f"cannot reach the Ray cluster at executor.address={cfg.address!r} ({exc}); expected "
            "a running cluster: 'auto' on one of its nodes, 'ray://HOST:10001' through Ray "
            "Client (`ray start --head` on HOST), or leave --address out to start a local Ray"
        ) from None
    return True


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@ray.remote
def _solve(solve: Callable[..., Any], Wb: torch.Tensor, Hb: torch.Tensor, pattern: str,
           bits: tuple[int, ...], cfg: SolverConfig, area: int, device: str) -> Any:
    """One unit on a worker (``Wb``, ``Hb`` arrive from the object store)."""
    return solve(Wb, Hb, pattern, bits, cfg, area, _device(device))


@dataclass
class _OpenLayer:
    """A layer whose units are in flight: its work, its pieces' object refs, what came back."""

    work: LayerWork
    refs: list[tuple[Any, Any]]
    units: list[Unit]
    solved: dict[Unit, Any] = field(default_factory=dict)


class _UnitQueue:
    """The units of a database build as Ray tasks.

    Layers are opened in forward order while fewer than twice the cluster's slots are in flight,
    each layer is written once all its units are back, and dead workers' units are resubmitted
    (:meth:`RayExecutor.solve_layers`).

    Attributes:
        opened: the layers with units in flight, by a running id.
        inflight: task ref → (layer id, unit, attempt).
        counts: units submitted, done and retried (for the status line).
    """

    def __init__(self, ex: RayExecutor, works: Iterator[LayerWork], cfg: SolverConfig,
                 device: str, write: Callable[[LayerSolutions], None],
                 progress: Callable[[str], None] | None) -> None:
        self.ex, self.works, self.cfg, self.device = ex, works, cfg, device
        self.write, self.progress = write, progress
        self.window = 2 * ex.slots(device)
        self.opened: dict[int, _OpenLayer] = {}
        self.inflight: dict[Any, tuple[int, Unit, int]] = {}
        self.counts = {"units": 0, "done": 0, "retried": 0}
        self.more, self.next_id = True, 0
        self.remote = _solve.options(max_retries=0, **ex._task_resources(device))

    def fill(self) -> None:
        """Open layers while the window has room and layers are left."""
        while self.more and len(self.inflight) < self.window:
            work = next(self.works, None)
            if work is None:
                self.more = False
                break
            self._open(work)

    def _open(self, work: LayerWork) -> None:
        lid, self.next_id = self.next_id, self.next_id + 1
        refs = []
        for k in range(len(work.pieces)):
            Wb, Hb = work.piece_inputs(k)
            refs.append((ray.put(Wb.contiguous()), ray.put(Hb)))
        units = layer_units(work, self.cfg)
        self.opened[lid] = _OpenLayer(work, refs, units)
        self.counts["units"] += len(units)
        for u in units:
            self._submit(lid, u, 0)
        if not units:
            self._finish(lid)

    def _submit(self, lid: int, unit: Unit, attempt: int) -> None:
        layer = self.opened[lid]
        w_ref, h_ref = layer.refs[unit.piece]
        ref = self.remote.remote(self.ex.solve, w_ref, h_ref, unit.pattern, unit.bits, self.cfg,
                                 layer.work.area, self.device)
        self.inflight[ref] = (lid, unit, attempt)

    def _finish(self, lid: int) -> None:
        layer = self.opened.pop(lid)
        self.write(assemble_layer(layer.work, layer.solved))

    def status(self) -> None:
        if self.progress is not None:
            c = self.counts
            self.progress(f"units {c['done']}/{c['units']}, {len(self.inflight)} in flight"
                          + (f", {c['retried']} retried" if c["retried"] else ""))

    def collect(self) -> None:
        """Wait for one task and take its result (or resubmit it when its worker died).

        Raises:
            ExecutorError: a unit's workers died more than ``executor.max_retries`` times.
        """
        done, _ = ray.wait(list(self.inflight), num_returns=1)
        for ref in done:
            lid, unit, attempt = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError:
                raise  # the solver's own error (a named exception): not a worker failure
            except ray.exceptions.RayError as exc:
                self._retry(lid, unit, attempt, exc)
                continue
            layer = self.opened[lid]
            layer.solved[unit] = result
            self.counts["done"] += 1
            if len(layer.solved) == len(layer.units):
                self._finish(lid)

    def _retry(self, lid: int, unit: Unit, attempt: int, exc: BaseException) -> None:
        what = (f"layer {self.opened[lid].work.info.name!r}, piece {unit.piece}, "
                f"{unit.pattern} at bits {list(unit.bits)}")
        max_retries = self.ex.cfg.max_retries
        if attempt >= max_retries:
            raise ExecutorError(
                f"{what}: its worker died {attempt + 1} times "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); expected "
                f"it to finish within executor.max_retries={max_retries} retries. Finished "
                "layers are kept: re-run the same command to resume, with more memory per task "
                "(executor.num_cpus / num_gpus) if the workers ran out of it"
            ) from None
        self.counts["retried"] += 1
        # the warning points where solve_layers was called: _retry, collect, solve_layers
        self.ex._report(what, exc, attempt + 1, stacklevel=4)
        self._submit(lid, unit, attempt + 1)

    def cancel(self) -> None:
        """Cancel every task still in flight."""
        for ref in self.inflight:
            ray.cancel(ref, force=True)


@ray.remote
class _Scorer:
    """An evaluation actor: holds one prepared task and scores plans on its validation split."""

    def __init__(self, prepared: Any) -> None:
        self.prepared = prepared

    def score(self, plan: CompressionPlan, fraction: float, eval_cfg: EvalConfig) -> float:
        from automl_compress.pipeline import validate_plan

        return validate_plan(self.prepared, plan, fraction, eval_cfg)


class RayExecutor:
    """Ray tasks for the build's units, Ray actors for the searches' evaluations.

    Args:
        cfg: the executor settings (address, workers, resources per task, retries).
        solve: the unit solver the tasks run (default
            :func:`~automl_compress.database.solve_unit`; tests wrap it).
    """

    kind = "ray"
    distributed = True

    def __init__(self, cfg: ExecutorConfig, solve: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.solve = solve or solve_unit
        self.failures: list[str] = []
        self._started = connect(cfg)
        self._actors: list[Any] | None = None
        self._scoring: Any = None

    # -- resources ---------------------------------------------------------------------------

    def num_gpus(self, device: str) -> float:
        """GPUs per task.

        ``executor.num_gpus``, or (null) 1 when ``device`` is cuda, or auto on a cluster with GPUs,
        else 0.
        """
        if self.cfg.num_gpus is not None:
            return self.cfg.num_gpus
        has_gpus = ray.cluster_resources().get("GPU", 0.0) > 0
        return 1.0 if device == "cuda" or (device == "auto" and has_gpus) else 0.0

    def _task_resources(self, device: str) -> dict[str, float]:
        return {"num_cpus": self.cfg.num_cpus, "num_gpus": self.num_gpus(device)}

    def slots(self, device: str) -> int:
        """How many solve tasks the cluster runs at once.

        Its CPUs and GPUs over each task's request; at least 1.

        Raises:
            ExecutorError: the tasks ask for GPUs and the cluster has none.
        """
        res = ray.cluster_resources()
        n = [res.get("CPU", 0.0) / self.cfg.num_cpus]
        gpus_per_task = self.num_gpus(device)
        if gpus_per_task > 0:
            gpus = res.get("GPU", 0.0)
            if gpus <= 0:
                raise ExecutorError(
                    f"every task asks for {gpus_per_task} GPU (device {device!r}, "
                    f"executor.num_gpus={self.cfg.num_gpus}), but the Ray cluster has none "
                    f"(resources {dict(res)}); set executor.num_gpus=0 or --device cpu, or join "
                    "a cluster with GPUs"
                )
            n.append(gpus / gpus_per_task)
        return max(1, int(min(n)))

    def _report(self, what: str, exc: BaseException, attempt: int, stacklevel: int = 2) -> None:
        """Record and warn about a dead worker (``stacklevel``: the warning's, from the caller)."""
        msg = (f"{what}: the worker died ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
               f"resubmitted (retry {attempt} of {self.cfg.max_retries})")
        self.failures.append(msg)
        warnings.warn(msg, WorkerFailure, stacklevel=stacklevel + 1)

    # -- the database build ------------------------------------------------------------------

    def solve_layers(self, works: Iterable[LayerWork], cfg: SolverConfig, device: str,
                     write: Callable[[LayerSolutions], None],
                     progress: Callable[[str], None] | None = None) -> None:
        """Solve every layer of ``works`` (forward order) as Ray tasks.

        ``write`` is called on each finished layer (in the order they finish).

        Args:
            works: the layers to solve (:func:`~automl_compress.database.work.layer_work`);
                consumed lazily, as the window of tasks in flight allows.
            cfg: solver settings.
            device: where the solvers run on the workers ('auto': a GPU when the worker has
                one).
            write: called on the driver with each assembled layer.
            progress: called with a one-line status (units done, running, retried).

        Raises:
            ExecutorError: a unit's workers died more than ``executor.max_retries`` times.
        """
        queue = _UnitQueue(self, iter(works), cfg, device, write, progress)
        try:
            while True:
                queue.fill()
                queue.status()
                if not queue.inflight:
                    break
                queue.collect()
                queue.status()
        finally:
            queue.cancel()

    # -- evaluations -------------------------------------------------------------------------

    def scorer(self, prepared: Any) -> Callable[[Sequence[tuple[CompressionPlan, float,
                                                                 EvalConfig]]], list[float]]:
        """A function scoring ``(plan, fraction, eval_cfg)`` items on the actor pool, in order.

        The first call ships ``prepared`` (after measuring its dense statistics and validation
        size here, once) to ``executor.workers`` actors.
        """
        if self._scoring is not None:
            return self._scoring
        prepared.dense_stats()
        if prepared.task.validate is not None:
            prepared.dense_val()  # an ItemMetric learns its split's size on the first call
        for info in prepared.db.order:
            prepared.db.layer(info.name)  # in memory: the actors never read the database folder
        payload = ray.put(dataclasses.replace(prepared, executor=None))
        retries = self.cfg.max_retries
        gpus = self.num_gpus(prepared.cfg.device)
        self._actors = [
            _Scorer.options(num_cpus=self.cfg.num_cpus, num_gpus=gpus, max_restarts=retries,
                            max_task_retries=retries).remote(payload)
            for _ in range(self.cfg.workers)
        ]
        pool = ActorPool(self._actors)

        def score(items: Sequence[tuple[CompressionPlan, float, EvalConfig]]) -> list[float]:
            try:
                return [float(v) for v in pool.map(lambda a, it: a.score.remote(*it), items)]
            except ray.exceptions.RayActorError as exc:
                raise ExecutorError(
                    f"an evaluation actor died more than executor.max_retries={retries} times "
                    f"({type(exc).__name__}); expected each to hold the model and score plans. "
                    "Give the actors more memory (fewer executor.workers) or use --executor local"
                ) from None

        self._scoring = score
        return score

    def close(self) -> None:
        """Stop the evaluation actors; shut Ray down if this executor started it."""
        for actor in self._actors or []:
            ray.kill(actor)
        self._actors, self._scoring = None, None
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False
