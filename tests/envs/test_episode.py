"""The budget form's episode bookkeeping: projection, the group budget rule, relative widths."""

from __future__ import annotations

import numpy as np

from automl_compress.envs.episode import LayerState, project


def test_project_takes_the_dearest_allowed_action_that_costs_no_more():
    cost = np.array([1.0, 2.0, 3.0, 4.0])
    mask = np.array([True, True, False, True])
    assert project(2, mask, cost) == 1  # 3 is not allowed: the dearest allowed at <= 3
    assert project(3, mask, cost) == 3
    assert project(-1, mask, cost) == 3  # out of range asks for the dearest
    assert project(0, np.array([False, True, False, True]), cost) == 1  # nothing cheaper: cheapest


def _state(budget: float) -> LayerState:
    groups = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]
    return LayerState(p=0, budget=budget, order=np.arange(6), groups=groups,
                      row_bits=np.zeros(6, dtype=np.int64))


def test_group_budget_rule_keeps_room_for_the_cheapest_later_groups():
    ob = np.array([0.0, 2.0, 4.0, 8.0])  # per-row cost of each width
    st = _state(budget=20.0)
    # group 0 (2 rows) at width i: 2·ob[i] + 4 rows × 0 <= 20
    assert st.allowed_widths(ob).tolist() == [True, True, True, True]
    rows = st.assign(3, 8, 8.0)
    assert rows.tolist() == [0, 1] and st.used == 16.0 and st.j == 1 and st.prev_group == 3
    assert st.row_bits.tolist() == [8, 8, 0, 0, 0, 0]
    # group 1 (1 row): 16 + ob[i] <= 20
    assert st.allowed_widths(ob).tolist() == [True, True, True, False]
    st.assign(0, 0, 0.0)
    st.assign(1, 2, 2.0)
    assert st.decided and st.used == 16.0 + 3 * 2.0


def test_relative_widths_centre_on_the_dearest_width_that_fits_the_fair_share():
    ob = np.array([0.0, 2.0, 4.0, 8.0])
    st = _state(budget=6 * 4.0)  # 4 bits per undecided row: width 2 is i*
    # nb = 4, c = 1: action a takes clip(2 + a - 1, 0, 3)
    assert st.relative_widths(ob, 4).tolist() == [1, 2, 3, 3]
    st = _state(budget=0.0)  # nothing fits but the free width
    assert st.relative_widths(ob, 4).tolist() == [0, 0, 1, 2]
