"""The packed layer format's codings: bit streams and N:M indices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from automl_compress.errors import InvalidInputError
from automl_compress.packing import nm_decode, nm_encode, nm_groups, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=1001).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.nbytes == math.ceil(1001 * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), values)
    with pytest.raises(InvalidInputError):
        pack_bits(np.array([2**bits], dtype=np.uint16), bits)


def test_nm_indices_pad_groups_that_keep_fewer_than_n():
    rng = np.random.default_rng(0)
    cols, m, n, area = 36, 4, 2, 9  # a 3x3 conv with 4 input channels: groups across channels
    groups = nm_groups(cols, m, area)
    assert sorted(groups.reshape(-1).tolist()) == list(range(cols))
    assert groups[0].tolist() == [0, 9, 18, 27]  # one tap, four input channels
    mask = np.zeros((4, cols), dtype=bool)
    for r in range(4):
        for g in groups:
            mask[r, rng.choice(g, size=1 if r == 0 else n, replace=False)] = True
    idx, full = nm_encode(mask, n, m, area)
    assert idx.shape == (4, cols // m, n) and int(idx.max()) < m
    assert np.array_equal(full[1:], mask[1:]) and (full[0] >= mask[0]).all()
    assert full.sum(axis=1).tolist() == [cols // 2] * 4
    assert np.array_equal(nm_decode(idx, cols, m, area), full)
    mask[0, groups[0]] = True  # four kept in one group: not 2:4
    assert nm_encode(mask, n, m, area) is None
