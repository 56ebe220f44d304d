"""The inference engine: continuous batching over a slot KV cache, shared by many callers at once.

A request is prompt tokens plus its own ``SamplingParams``. The engine owns one KV cache of
``max_batch_size`` slots × ``max_seq_len`` positions, allocated once; each admitted request owns a slot for
its whole life and nothing is ever copied between slots. Greedy results in float32 are token-identical to a
request run alone, and seeded sampling draws the same tokens whatever else shares the batch.

The parts, split as vLLM's engine is:

* ``request.py``: what a caller asks for (``SamplingParams``) and gets back (``Request``, ``Event``), and
  the states a request passes through (``RequestState``);
* ``detokenizer.py``: a request's text as its tokens arrive, cut at its stop strings;
* ``scheduler.py``: pure Python, no model: which requests run in the next step, in which slot, with how
  many tokens (the algorithm is stated at its top);
* ``runner.py``: runs a step's forwards over the slot cache (eager, compiled, speculative) and samples;
* ``loop.py``: ``Engine``, which ties them together: submitting, the step, the threads that drive it and
  the tensor-parallel followers;
* ``speculative.py``: proposers (prompt lookup, a draft model) and the verification rule.
"""

from .loop import Engine
from .request import (FINISH_REASONS, MAX_TOP_LOGPROBS, EngineFull, EngineStopped, Event, Request, RequestState,
                      SamplingParams)
from .scheduler import MIN_REUSE
from ..sampling import TopLogprobs

__all__ = ["Engine", "EngineFull", "EngineStopped", "Event", "Request", "RequestState", "SamplingParams",
           "FINISH_REASONS", "MAX_TOP_LOGPROBS", "MIN_REUSE", "TopLogprobs"]
