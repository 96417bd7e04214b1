"""Resolve a :class:`~automl_compress.config.TaskConfig` to a :class:`~.base.Task`.

A task name is either a key of the built-in zoo (imported lazily, so heavy optional packages are
only touched by the task that needs them) or a dotted path ``package.module:function`` to the
user's own factory, imported with :mod:`importlib` (never ``eval``) and called with
``**options``. Built-in factories also receive the resolved ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from automl_compress.attention import unfuse_task
from automl_compress.config import TaskConfig
from automl_compress.errors import TaskError
from automl_compress.zoo.base import Task
from automl_compress.zoo.generic import HF_PREFIX, hf_task, task_from_model

CACHE_ENV = "AUTOML_COMPRESS_CACHE"

# key -> "module:function" inside this package
BUILTIN_TASKS: dict[str, str] = {
    "digits_cnn": "automl_compress.zoo.digits:digits_cnn",
    "digits_cnn_wide": "automl_compress.zoo.digits:digits_cnn_wide",
    "crepe_tiny": "automl_compress.zoo.crepe:crepe_tiny",
    "crepe_full": "automl_compress.zoo.crepe:crepe_full",
    "minilm_l6": "automl_compress.zoo.minilm:minilm_l6",
}

_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def task_names() -> list[str]:
    """The built-in task keys."""
    return sorted(BUILTIN_TASKS)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$AUTOML_COMPRESS_CACHE``, else ``~/.cache/automl-compress``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "automl-compress"


def _import_factory(path: str) -> Callable[..., Any]:
    if not _DOTTED.match(path):
        raise TaskError(
            f"task name {path!r} is neither a built-in task ({', '.join(task_names())}) nor a "
            "dotted path 'package.module:function'"
        )
    module_name, attr = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"cannot import module {module_name!r} for task {path!r}: {exc}; expected an "
            "importable 'package.module:function' (check PYTHONPATH and the spelling)"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TaskError(
                f"module {module_name!r} has no attribute {attr!r} (task {path!r}); expected a "
                "function returning an automl_compress.zoo.base.Task"
            ) from exc
    if not callable(obj):
        raise TaskError(f"task factory {path!r} is a {type(obj).__name__}, expected a callable")
    return obj


def _call(factory: Callable[..., Any], path: str, kwargs: dict[str, Any]) -> Any:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise TaskError(
            f"task {path!r} does not accept the options {sorted(kwargs)}: {exc}; check "
            "task.options against the factory's signature"
        ) from exc
    except ValueError:  # no signature available (builtins): let the call decide
        pass
    return factory(**kwargs)


def load_task(config: TaskConfig) -> Task:
    """Build the task a config names.

    Args:
        config: ``name`` (zoo key or ``package.module:function``), ``options`` (keyword arguments
            of the factory), ``cache_dir``.

    Returns:
        The :class:`Task`.

    Raises:
        TaskError: unknown name, import failure, bad options, a missing optional package, or a
            factory that does not return a Task.
    """
    name = config.name
    options = dict(config.options)
    if name.startswith(HF_PREFIX):
        task = _call(hf_task, name, {"path": name[len(HF_PREFIX):], **options})
        return _with_distance(task, config)
    if config.inputs is not None:
        model = _call(_import_factory(name), name, options)
        if not isinstance(model, nn.Module):
            raise TaskError(f"model factory {name!r} returned a {type(model).__name__}, expected "
                            "a torch.nn.Module (task.inputs is set, so task.name names a model)")
        batches = _call(_import_factory(config.inputs), config.inputs,
                        dict(config.inputs_options))
        return unfuse_task(task_from_model(name, model, batches, config.distance or "mse"))
    if name in BUILTIN_TASKS:
        factory = _import_factory(BUILTIN_TASKS[name])
        options.setdefault("cache_dir", resolve_cache_dir(config.cache_dir))
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise TaskError(
            f"unknown task {name!r}; valid names: {', '.join(task_names())}, or a dotted path "
            "'package.module:function' to your own factory returning a Task"
        )
    task = _call(factory, name, options)
    if not isinstance(task, Task):
        raise TaskError(
            f"task factory {name!r} returned a {type(task).__name__}, expected an "
            "automl_compress.zoo.base.Task (model, calib, evaluate, metric_name); or set "
            "task.inputs to have a Task made from a model and inputs"
        )
    return _with_distance(task, config)


def _with_distance(task: Task, config: TaskConfig) -> Task:
    task = dataclasses.replace(task, distance=config.distance) if config.distance else task
    return unfuse_task(task)  # nn.MultiheadAttention -> Linear projections, on a copy
