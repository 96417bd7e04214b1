"""bench/search.py's range table: the means, the zero-shot shortfall and the spend it prints,
all over the seeds every method holds in full."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.search import range_table  # noqa: E402


def _row(test: float, val: float) -> dict:
    return {"metric": test, "metric_val": val, "evaluations": 1.0, "wall_seconds": 0.0,
            "avg_bits": 3.0}


def test_range_table_means_shortfall_and_spend():
    runs = {}
    for s, (z, d) in enumerate([(0.80, 0.84), (0.90, 0.88)]):
        runs[f"range/{s}"] = {"trained": {"evaluations_by_budget": {"3": 10.0 + s, "4": 2.0}},
                              "zero_shot": {"3": _row(z, z - 0.1), "4": _row(0.9, 0.8)},
                              "checked": {}}
        runs[f"dedicated/3/{s}"] = _row(d, d)
        runs[f"dedicated/4/{s}"] = _row(0.92, 0.9)
        runs[f"dp/3/{s}"] = _row(0.82, 0.8)
    # seed 2 has a range run but a dedicated row at one budget only: left out of every column
    runs["range/2"] = {"trained": {"evaluations_by_budget": {"3": 99.0}},
                       "zero_shot": {"3": _row(0.1, 0.1), "4": _row(0.1, 0.1)}, "checked": {}}
    runs["dedicated/3/2"] = _row(0.1, 0.1)
    head, _, *lines = range_table({"grid": [3.0, 4.0], "runs": runs}).splitlines()
    assert head == "seeds 0, 1 (left out, incomplete: 2)"
    assert lines[0] == ("| budget | zero-shot test (val) | dedicated test (val) | dp test (val) "
                        "| zero-shot − dedicated |")
    row3 = lines[2].split(" | ")
    assert row3[1] == "0.8500 ± 0.0707 (0.7500)" and row3[-1] == "-1.00 pt |"
    assert lines[3].split(" | ")[-1] == "-2.00 pt |"
    mean = lines[4].split(" | ")
    # dp has no row at 4 bits: no grid mean
    assert mean[1] == "0.8750 (0.7750)" and mean[2] == "0.8900 (0.8800)" and mean[3] == "–"
    assert mean[-1] == "-1.50 pt |"
    assert lines[-1].endswith("3: 10.5 / 4: 2.0")


def test_range_table_without_dedicated_rows_has_no_shortfall_column():
    runs = {"range/0": {"trained": {}, "zero_shot": {"3": _row(0.8, 0.7)}, "checked": {}}}
    head, _, *lines = range_table({"grid": [3.0], "runs": runs}).splitlines()
    assert head == "seeds 0"
    assert "dedicated" not in lines[0] and len(lines) == 4
    assert lines[2] == "| 3 | 0.8000 ± 0.0000 (0.7000) |"
    assert pytest.approx(0.8) == float(lines[3].split(" | ")[1].split()[0])


def test_range_table_marks_the_budgets_the_policy_did_not_train_at():
    """``--eval-step``: a budget between the training grid's is marked †, and the spend line
    names the training budgets only."""
    runs = {"range/0": {"trained": {"evaluations_by_budget": {"3": 5.0, "4": 7.0}},
                        "zero_shot": {b: _row(0.8, 0.7) for b in ("3", "3.5", "4")},
                        "checked": {}}}
    text = range_table({"grid": [3.0, 3.5, 4.0], "trained_grid": [3.0, 4.0], "runs": runs})
    lines = text.splitlines()
    assert [ln.split(" | ")[0] for ln in lines[4:7]] == ["| 3", "| 3.5 †", "| 4"]
    assert "† not a budget the policy trained at" in text
    assert lines[-1].endswith("3: 5.0 / 4: 7.0")
    # without trained_grid (files written before --eval-step) nothing is marked
    plain = range_table({"grid": [3.0, 3.5, 4.0], "runs": runs})
    assert "†" not in plain
