"""Layer database: contents, exactness of stored rows, resume, mismatch and corruption."""

from __future__ import annotations

import dataclasses
import json
import threading
import warnings

import numpy as np
import pytest
import torch
from _compress_task import make_task, tiny_config

from automl_compress.capture import capture_hessians
from automl_compress.database.build import build_database
from automl_compress.database.costs import kept_per_row
from automl_compress.database.store import BUILD_LOCK, LayerDatabase
from automl_compress.database.work import kernel_area
from automl_compress.errors import CorruptCacheError, DatabaseMismatchError
from automl_compress.io import exclusive_lock
from automl_compress.specs import Pattern


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def built(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    cfg = tiny_config()
    return build_database(task, cfg, root, progress=False), cfg


def test_tables_shapes_patterns_and_zero_bit_energy(task, built):
    db, cfg = built
    names = [i.name for i in db.order]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    hess = capture_hessians(task.model, task.calib, task.forward)
    for info in db.order:
        t = db.table(info.name)
        assert t.bits == (0, 2, 4, 8)
        # conv1 has C_in = 1, so 2:4 along input channels does not fit it
        expected = ("dense", "50%") if info.name == "conv1" else ("dense", "2:4", "50%")
        assert t.patterns == expected
        assert t.errors.shape == (info.rows, len(expected), 4)
        W = dict(task.model.named_modules())[info.name].weight.detach().flatten(1)
        energy = hess[info.name].row_errors(W, torch.zeros_like(W)).numpy()
        for p in range(len(expected)):
            np.testing.assert_allclose(t.errors[:, p, 0], energy, rtol=1e-10)
        # more bits never hurt much on the dense pattern, and 8 bits is near lossless
        dense = t.errors[:, 0, :].sum(axis=0)
        assert dense[3] < dense[2] < dense[1] < dense[0]


def test_stored_sparse_rows_keep_exact_counts(built):
    """Every stored row of a sparse option keeps exactly the pattern's count (N:M: exactly N in
    every group of M input channels at one kernel tap), and its pruned positions hold the zero
    point, so they dequantize to exactly 0."""
    db, _ = built
    for info in db.order:
        sol = db.layer(info.name)
        area = kernel_area(info)
        for (p, b), opt in sol.options.items():
            if p == "dense":
                assert opt.mask is None
                continue
            kept = opt.mask.sum(dim=1)
            assert bool((kept == kept_per_row(info.cols, p)).all()), (info.name, p, b)
            n_m = Pattern.parse(p).n_m
            if n_m is not None:
                n, m = n_m
                groups = opt.mask.view(info.rows, info.cols // area, area).transpose(1, 2)
                per_group = groups.reshape(info.rows, area, -1, m).sum(-1)
                assert bool((per_group == n).all()), (info.name, p, b)
            assert bool((opt.codes <= 2**b - 1).all())
            zero = opt.zero[:, 0].round().to(torch.uint8)[:, None].expand_as(opt.codes)
            assert torch.equal(opt.codes[~opt.mask], zero[~opt.mask]), (info.name, p, b)


def test_resume_after_interruption_loses_nothing(task, tmp_path):
    cfg = tiny_config()
    root = tmp_path / "db"
    seen = []

    def stop_after_two(name):
        seen.append(name)
        if len(seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_database(task, cfg, root, progress=False, on_layer_done=stop_after_two)
    manifest = json.loads((root / "manifest.json").read_text())
    assert not manifest["complete"] and list(manifest["layers"]) == ["conv1", "conv2"]
    first = {n: (root / e["file"]).read_bytes() for n, e in manifest["layers"].items()}
    mtimes = {n: (root / e["file"]).stat().st_mtime_ns for n, e in manifest["layers"].items()}
    resumed = []
    db = build_database(task, cfg, root, progress=False, on_layer_done=resumed.append)
    assert resumed == ["fc1", "fc2"]
    assert db.complete
    for n, e in json.loads((root / "manifest.json").read_text())["layers"].items():
        if n in first:
            assert (root / e["file"]).read_bytes() == first[n]
            assert (root / e["file"]).stat().st_mtime_ns == mtimes[n]
    fresh = build_database(task, cfg, tmp_path / "fresh", progress=False)
    for info in db.order:
        np.testing.assert_allclose(db.table(info.name).errors, fresh.table(info.name).errors,
                                   rtol=1e-9)
    # a complete database is reused without solving anything
    again = []
    build_database(task, cfg, root, progress=False, on_layer_done=again.append)
    assert again == []


def test_mismatch_names_what_differs(task, built):
    db, cfg = built
    other_menu = dataclasses.replace(cfg, menu=dataclasses.replace(cfg.menu, bits=(0, 3, 8)))
    with pytest.raises(DatabaseMismatchError, match="menu"):
        build_database(task, other_menu, db.root, progress=False)
    other_calib = dataclasses.replace(task, calib=task.calib[:2])
    with pytest.raises(DatabaseMismatchError, match="calibration"):
        build_database(other_calib, cfg, db.root, progress=False)
    changed = make_task(seed=1)
    with pytest.raises(DatabaseMismatchError, match="model"):
        build_database(changed, cfg, db.root, progress=False)


def test_corrupt_layer_file_raises_on_read_and_is_rebuilt(task, tmp_path):
    cfg = tiny_config()
    root = tmp_path / "db"
    build_database(task, cfg, root, progress=False)
    entry = json.loads((root / "manifest.json").read_text())["layers"]["fc1"]
    path = root / entry["file"]
    data = bytearray(path.read_bytes())
    data[-10:] = b"\x00" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="checksum"):
        LayerDatabase.open(root).layer("fc1")
    with pytest.warns(UserWarning, match="corrupt"):
        db = build_database(task, cfg, root, progress=False)
    assert db.verify_layer("fc1") is None
    assert db.table("fc1").errors.shape[0] == 32


def test_second_build_of_one_folder_waits_for_the_first(task, tmp_path):
    # two benchmark jobs sharing a database folder once raced: each wrote its own manifest over
    # the other's, leaving records whose checksums no longer matched the files
    cfg = tiny_config()
    root = tmp_path / "db"
    outcome: dict[str, object] = {}

    def second_build():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome["db"] = build_database(task, cfg, root, progress=False)
        outcome["warnings"] = [str(w.message) for w in caught]

    with exclusive_lock(root / BUILD_LOCK):  # the first build, as another process would hold it
        thread = threading.Thread(target=second_build)
        thread.start()
        thread.join(timeout=2.0)
        assert thread.is_alive(), "the second build did not wait for the lock"
        assert not (root / "manifest.json").exists()
    thread.join()
    db = outcome["db"]
    assert db.complete and all(db.verify_layer(i.name) is None for i in db.order)
    assert any("being built by another process (pid " in m for m in outcome["warnings"])
