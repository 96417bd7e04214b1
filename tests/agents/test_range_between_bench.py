"""bench/range_between.py's table: each start's means, the per-seed gain of the lent start and
where it was lent from."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from range_between import table  # noqa: E402


def _row(test: float, val: float) -> dict:
    return {"metric": test, "metric_val": val, "evaluations": 0.0}


def test_range_between_table_means_gain_and_source():
    seeds = {
        "0": {"2.625": {"lent": _row(0.84, 0.80), "dp-start": _row(0.76, 0.75),
                        "dp": _row(0.76, 0.75), "lent_from": 2.5},
              "2.875": {"lent": _row(0.80, 0.80), "dp-start": _row(0.80, 0.80),
                        "dp": _row(0.79, 0.78), "lent_from": None}},
        "1": {"2.625": {"lent": _row(0.74, 0.70), "dp-start": _row(0.76, 0.75),
                        "dp": _row(0.76, 0.75), "lent_from": 2.5},
              "2.875": {"lent": _row(0.82, 0.81), "dp-start": _row(0.80, 0.80),
                        "dp": _row(0.79, 0.78), "lent_from": 2.75}},
    }
    head, _, header, _, first, second, mean = table({"seeds": seeds}).splitlines()
    assert head == "seeds 0, 1"
    assert header.startswith("| budget | lent test (val) | dp-start test (val) | dp test (val) "
                             "| checked test (val)")
    cells = first.split(" | ")
    assert cells[1] == "0.7900 ± 0.0707 (0.7500)" and cells[2] == "0.7600 ± 0.0000 (0.7500)"
    # checked: seed 0 keeps the lent plan (0.80 > 0.75 on val), seed 1 the DP plan (0.75 > 0.70)
    assert cells[4] == "0.8000 ± 0.0566 (0.7750)"
    assert cells[5] == "+8.00 / -2.00" and cells[6] == "2.5 / 2.5 |"
    assert second.split(" | ")[-1] == "– / 2.75 |"
    # lent: (0.79 + 0.81) / 2 = 0.80 against dp-start's 0.78: +2 points over the midpoints
    assert mean.split(" | ")[1] == "0.8000 (0.7775)" and mean.endswith("| +2.00 | |")
