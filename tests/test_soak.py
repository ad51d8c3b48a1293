"""Back-to-back 3-rank Gloo jobs of 30 epochs all exit 0 (no shutdown race). See tests/soak.py."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from soak import soak  # noqa: E402

pytestmark = pytest.mark.multirank


def test_three_back_to_back_gloo_runs_exit_0():
    results = soak(runs=3, epochs=30, np_=3)
    assert [rc for rc, _ in results] == [0, 0, 0]
