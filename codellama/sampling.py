"""Choosing the next token from logits: pure functions, tested on their own."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def check_sampling_args(temperature: float, top_p: float, top_k: Optional[int]) -> None:
    """Raise ``ValueError`` naming the value when a sampling argument is out of range or of the wrong type."""
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number ≥ 0 (0 means greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Logits are divided by the temperature in float32: below float32's smallest normal number the divisor
# rounds to 0 (or loses all precision) and the division gives NaN, so such a temperature means greedy.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


def is_greedy(temperature: float) -> bool:
    """Whether ``temperature`` samples greedily: 0, or too small for float32 to divide by."""
    return temperature < GREEDY_BELOW


def usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows of ``logits`` (B, V) that a token can be chosen from: no NaN, no +inf, not all -inf."""
    return ~(torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)) & (logits > float("-inf")).any(-1)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling as in Meta's reference: probs (B, V) → token ids (B,).

    Sort descending and drop every token whose *preceding* cumulative mass already exceeds ``p``
    (so the most likely token always stays), renormalise, draw one.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    preceding = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(preceding > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1) index into sorted
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def restrict_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (B, V) with everything below the k-th largest value set to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from float logits (B, V): greedy at ``temperature == 0`` (or one too small for float32,
    :func:`is_greedy`), else temperature, top-k, top-p."""
    if is_greedy(temperature):
        return torch.argmax(logits, dim=-1)
    probs = _tempered_probs(logits, temperature, top_k)
    if top_p >= 1.0:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return sample_top_p(probs, top_p, generator)


def sampling_probs(logits: torch.Tensor, temperature: float = 0.6, top_p: float = 0.9,
                   top_k: Optional[int] = None) -> torch.Tensor:
    """The distribution (B, V) that ``sample`` draws from, explicitly (speculative decoding needs it):
    one-hot at the argmax when greedy; else tempered, top-k and top-p restricted, renormalised."""
    if is_greedy(temperature):
        return torch.nn.functional.one_hot(torch.argmax(logits, dim=-1), logits.shape[-1]).float()
    probs = _tempered_probs(logits, temperature, top_k)
    if top_p >= 1.0:
        return probs
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    drop = (torch.cumsum(probs_sort, dim=-1) - probs_sort) > top_p  # the same rule as sample_top_p
    probs = probs.scatter(-1, probs_idx, probs_sort.masked_fill(drop, 0.0))
    return probs / probs.sum(dim=-1, keepdim=True)


def _tempered_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    # Shift by the maximum first: with a tiny temperature the scaled logits would overflow to inf (and the
    # softmax to NaN); shifted, the best token scales to 0 and the others to -inf, i.e. greedy.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = restrict_top_k(logits, top_k)
    return torch.softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (…,) of ``tokens`` (…,) under the raw (untempered) ``logits`` (…, V), as the reference reports them."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


TopLogprobs = List[Tuple[int, float]]  # (token id, log-probability), most likely first


def logprobs_and_top(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> Tuple[List[float], List[TopLogprobs]]:
    """From one log-softmax of ``logits`` (rows, V): each row's log-probability of its token in ``tokens``
    (rows,), as :func:`token_logprobs` gives it, and the row's ``k`` likeliest tokens (an empty list each when
    ``k`` is 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
    if k == 0:
        return chosen, [[] for _ in chosen]
    values, ids = logp.topk(min(k, logits.shape[-1]), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
