"""Parity rows: absolute tolerance plus a part relative to the output's scale, and a cosine floor."""
from __future__ import annotations

import numpy as np
import pytest

from compress.errors import OutputMatchError
from compress.exporters.parity import check, compare_outputs


def test_parity_tolerance_scales_with_the_largest_output():
    ref = np.array([30.0, -12.0, 0.5])
    got = ref + np.array([0.009, 0.0, 0.0])  # SmolLM2's logits after export differ by this much

    assert not compare_outputs("logits", ref, got, atol=1e-3, min_cosine=0.9999)["ok"]
    assert compare_outputs("logits", ref, got, atol=1e-3, min_cosine=0.9999, rtol=5e-4)["ok"]  # 1e-3 + 5e-4 * 30


def test_parity_failure_lists_every_output_with_its_tolerance():
    feeds = [{"x": 1}]

    with pytest.raises(OutputMatchError, match=r"FAIL a: max_abs_diff=1 \(tolerance 0.001\).*\n.*OK   b"):
        check("demo", lambda f: {"a": np.zeros(3), "b": np.ones(3)},
              lambda f: {"a": np.array([1.0, 0, 0]), "b": np.ones(3)}, feeds, atol=1e-3, min_cosine=0.99)
