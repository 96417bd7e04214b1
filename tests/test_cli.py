import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automl_compress.cli import main


def test_info_reports_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "automl-compress" in out and "torch" in out and "gymnasium" in out


def test_print_config_shows_resolved_values(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("solver:\n  quant: gptq\n")
    code = main(
        ["compress", "--config", str(cfg), "--method", "dp", "--budget-bits", "3",
         "--out", str(tmp_path / "run"), "--set", "seed=5", "--print-config"]
    )
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["solver"]["quant"] == "gptq"
    assert resolved["env"]["budget_bits"] == 3.0
    assert resolved["seed"] == 5
    assert not (tmp_path / "run").exists()


def test_config_typo_is_a_clear_error_with_exit_code_2(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("solver:\n  qant: gptq\n")
    code = main(["build-db", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'solver.qant'" in err and "did you mean 'quant'" in err


def test_console_script_module_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "automl_compress.cli", "info"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "automl-compress" in proc.stdout


def test_switch_word_override_from_the_command_line(capsys, tmp_path):
    # YAML reads `off` as a boolean; the choice is still accepted (it used to ask for quotes)
    code = main(["compress", "--config", str(tmp_path / "missing.yaml"), "--method", "dp",
                 "--budget-bits", "3", "--out", str(tmp_path / "run"), "--print-config"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  bias_correction: no\n")
    code = main(["compress", "--config", str(cfg), "--method", "dp", "--budget-bits", "3",
                 "--out", str(tmp_path / "run"), "--set", "eval.bn_reestimate=off",
                 "--print-config"])
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["eval"]["bn_reestimate"] == "off"
    assert resolved["eval"]["bias_correction"] is False


def test_report_and_export_help_name_the_formats(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "state_dict" in out and "packed" in out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--tb" in capsys.readouterr().out


def test_a_range_run_needs_no_budget_bits_and_a_single_one_does(capsys, tmp_path):
    """`train --budget-range LOW HIGH` alone writes its plan at the range's middle rounded to
    `env.budget_step`; without either flag `train` is a named error, exit code 2."""
    base = ["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "run")]
    (tmp_path / "none.yaml").write_text("seed: 0\n")
    for rng, mid in ((("2.5", "4"), 3.25), (("1", "2"), 1.5), (("0.75", "1.75"), 1.25)):
        assert main([*base, "--budget-range", *rng, "--print-config"]) == 0
        env = yaml.safe_load(capsys.readouterr().out)["env"]
        assert env["budget_bits"] == mid and env["budget_range"] == [float(r) for r in rng]
    # rounded to the step (the benches' range runs at 3 bits on a 0.5 grid)
    assert main([*base, "--budget-range", "2.5", "4", "--set", "env.budget_step=0.5",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["env"]["budget_bits"] == 3.0
    # an explicit budget is kept
    assert main([*base, "--budget-range", "2.5", "4", "--budget-bits", "4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["env"]["budget_bits"] == 4.0
    assert main(base) == 2
    assert "--budget-bits B (one budget) or --budget-range LOW HIGH" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_db_links_a_shared_database_and_refuses_a_clash(capsys, tmp_path, monkeypatch):
    """`--db DIR`: OUT/db links to DIR and no layer is solved again; an OUT that holds its own
    database, or a DIR of another setup, is a named error that leaves OUT as it was."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # the tiny task
    from _compress_task import TINY_YAML as TINY
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["build-db", "--config", str(cfg), "--out", str(first)]) == 0
    layers = {p: p.stat().st_mtime_ns for p in (first / "db/layers").iterdir()}
    args = ["compress", "--config", str(cfg), "--method", "dp", "--budget-bits", "3"]
    assert main([*args, "--db", str(first / "db"), "--out", str(second)]) == 0
    assert (second / "db").is_symlink()
    assert (second / "db").resolve() == (first / "db").resolve()
    assert {p: p.stat().st_mtime_ns for p in (first / "db/layers").iterdir()} == layers
    assert main([*args, "--db", str(first / "db"), "--out", str(second)]) == 0  # the same link
    assert main([*args, "--db", str(first / "db"), "--out", str(first)]) == 0  # its own folder
    capsys.readouterr()
    # the first run holds a database of its own
    assert main([*args, "--db", str(tmp_path / "elsewhere"), "--out", str(first)]) == 2
    assert "already holds a database" in capsys.readouterr().err
    # another menu's run cannot use the first one's database: no link is left behind
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("[0, 2, 4, 8]", "[0, 4, 8]"))
    third = tmp_path / "third"
    assert main(["compress", "--config", str(other), "--method", "dp", "--budget-bits", "3",
                 "--db", str(first / "db"), "--out", str(third)]) == 2
    err = capsys.readouterr().err
    assert "holds a layer database built for a different setup: menu" in err
    assert "drop --db" in err and "delete" not in err
    assert not (third / "db").is_symlink() and not (third / "db").exists()


def test_db_refuses_a_file_or_a_folder_that_is_no_database(capsys, tmp_path, monkeypatch):
    """`--db` naming a file, a run folder (not its db/) or a folder of other files is a named
    error before anything is written: no OUT, nothing added to the folder."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # the tiny task
    from _compress_task import TINY_YAML as TINY
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    assert main(["build-db", "--config", str(cfg), "--out", str(run)]) == 0
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    before = {p.name for p in run.iterdir()}
    args = ["compress", "--config", str(cfg), "--method", "dp", "--budget-bits", "3"]
    for db, says in ((tmp_path / "a_file", "is a file"),
                     (run, f"did you mean --db {(run / 'db').resolve()}"),
                     (tmp_path / "other", "give a new or empty folder")):
        out = tmp_path / f"out_{db.name}"
        assert main([*args, "--db", str(db), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()
    assert {p.name for p in run.iterdir()} == before
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
