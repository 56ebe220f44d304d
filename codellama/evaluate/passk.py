"""The unbiased pass@k estimator of Chen et al. (2021), as used by the Code Llama paper.

With ``n`` samples of which ``c`` pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that at least one
of ``k`` samples drawn without replacement passes. The product form below equals it without computing
huge binomials: C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i).
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence, Tuple

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated probability that at least one of ``k`` samples passes, from ``c`` passes in ``n`` samples."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}: pass@k needs at least k samples per task")
    if n - c < k:  # every draw of k samples includes a passing one
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def usable_ks(n_min: int, ks: Sequence[int] = DEFAULT_KS) -> Tuple[int, ...]:
    """The ``ks`` that ``n_min`` samples per task allow (k <= n)."""
    return tuple(k for k in ks if k <= n_min)


def estimate(counts: Mapping[str, Tuple[int, int]], ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """Mean pass@k over tasks, for each k the smallest sample count allows.

    ``counts`` maps a task to ``(n, c)``; returns ``{"pass@1": …, "pass@10": …}``.
    """
    if not counts:
        raise ValueError("no tasks to score")
    allowed = usable_ks(min(n for n, _ in counts.values()), tuple(ks))
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in allowed}
