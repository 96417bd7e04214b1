"""Built-in tasks (model + calibration data + held-out metric), loaded offline.

``load_task(TaskConfig(name=...))`` with a key of :data:`BUILTIN_TASKS` (``digits_cnn``,
``digits_cnn_wide``, ``crepe_tiny``, ``crepe_full``, ``minilm_l6``) or a dotted path
``package.module:function``. Importing this package imports no model code: each task module is
imported only when its task is loaded.
"""

from automl_compress.zoo.base import Task, default_forward, model_fingerprint
from automl_compress.zoo.registry import BUILTIN_TASKS, load_task, resolve_cache_dir, task_names

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "default_forward",
    "load_task",
    "model_fingerprint",
    "resolve_cache_dir",
    "task_names",
]
