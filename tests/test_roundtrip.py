"""The export check's output comparison (the export itself runs in tests/commands/)."""

from __future__ import annotations

import torch

from automl_compress.roundtrip import same_outputs


def test_same_outputs_within_tolerance_and_through_containers():
    a = torch.linspace(-1.0, 1.0, 11)
    assert same_outputs(a, a + 1e-7)
    assert not same_outputs(a, a + 1e-3)
    assert same_outputs({"x": a, "y": (a, [a])}, {"x": a.clone(), "y": (a.clone(), [a.clone()])})
    assert not same_outputs({"x": a, "y": (a, [a])}, {"x": a, "y": (a, [a * 2])})
    assert same_outputs("label", "label") and not same_outputs(3, 4)
