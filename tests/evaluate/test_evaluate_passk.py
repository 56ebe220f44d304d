"""The unbiased pass@k estimator against its closed form 1 - C(n-c, k) / C(n, k)."""

from math import comb

import pytest

from codellama.evaluate.passk import estimate, pass_at_k, usable_ks


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 100, 200])
def test_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1.0 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_known_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction that passes
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2)


def test_estimate_averages_tasks_and_reports_only_allowed_ks():
    report = estimate({"a": (10, 10), "b": (10, 0), "c": (20, 5)})
    assert set(report) == {"pass@1", "pass@10"}  # n=10 allows k=1 and 10, not 100
    assert report["pass@1"] == pytest.approx((1.0 + 0.0 + 0.25) / 3)
    assert report["pass@10"] == pytest.approx((1.0 + 0.0 + 1 - comb(15, 10) / comb(20, 10)) / 3)
    assert set(estimate({"a": (1, 0)})) == {"pass@1"}
    assert set(estimate({"a": (200, 7)})) == {"pass@1", "pass@10", "pass@100"}
    assert usable_ks(9) == (1,) and usable_ks(100) == (1, 10, 100)


@pytest.mark.parametrize("n, c, k, match", [
    (5, 6, 1, "c <= n"), (5, -1, 1, "c <= n"), (5, 2, 6, "k <= n"), (5, 2, 0, "k <= n"), (5.0, 2, 1, "n must"),
])
def test_bad_arguments(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)
    with pytest.raises(ValueError, match="no tasks"):
        estimate({})
