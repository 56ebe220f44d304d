"""One llama.cpp completion followed through the engine, with llama.cpp's own stopping rules and result shape.

The engine stops a request at a stop token, a stop string, ``n_predict`` or the end of the context. On top of
that, as llama.cpp's server does, this module watches each request's events and:

- ``n_indent``: ends the answer at a new line indented less than ``n_indent`` characters (a blank line counts
  as indented 0); the answer stops before that line;
- ``t_max_predict_ms``: ends it at the first new line produced after that many milliseconds of generation;
- ``n_predict: 0``: evaluates the prompt into the cache (the first token is drawn, then dropped) and answers
  nothing, which is how editors warm the cache with their extra context;
- context shift (the server's ``--context-shift``): when the context is full before ``n_predict`` tokens,
  keeps the first ``n_keep`` tokens (+ BOS), drops ``n_discard`` (half of the rest by default) and continues
  in a new engine request over the shortened context (recomputed, not shifted in place).

It then answers in llama.cpp's shape: ``content``, ``tokens``, ``stop_type`` (``eos``, ``word``, ``limit``),
``stopping_word``, ``truncated`` (the prompt was cut to fit, or the context ran out), ``has_new_line``,
``timings`` and ``completion_probabilities``; streamed, one chunk per token with its ``tokens``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..engine import Event, SamplingParams
from ..tokenizer import TextStream
from .service import Generation, ModelService, Prompt

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # what llama.cpp reports as the seed of a request with a random one


@dataclass(frozen=True)
class Rules:
    """A request's stopping rules and what its answer reports, beside the engine's ``SamplingParams``."""

    n_predict: int = -1  # -1: no limit
    n_indent: int = 0
    t_max_predict_ms: int = -1
    n_probs: int = 0
    return_tokens: bool = False
    context_shift: bool = False
    n_keep: int = 0
    n_discard: int = 0
    settings: Optional[dict] = None  # generation_settings as llama.cpp reports them


@dataclass
class Piece:
    """What one step adds to an answer: its text (possibly cut), its token, and the token's probabilities."""

    text: str
    token: Optional[int]
    probs: Optional[dict] = None


class Completion:
    """One answer of a request (one prompt, one of ``n_cmpl``) and the engine request(s) behind it."""

    def __init__(self, service: ModelService, generation: Generation, index: int, request: int, rules: Rules):
        """``request`` is this answer's engine request in ``generation``; ``index`` its place in the response."""
        self.service, self.generation, self.index, self.rules = service, generation, index, rules
        self.prompt: Prompt = generation.prompts[request]
        self.segments: List[int] = [request]  # its engine requests, in order (several after a context shift)
        self.text, self.tokens, self.probs = "", [], []
        self.stop_type, self.stopping_word = "none", ""
        self.truncated, self.has_new_line, self.done = self.prompt.truncated, False, False
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self._texts = TextStream(service.tokenizer, self.prompt.decode)  # each token's own text

    @property
    def request(self):
        """The current engine request."""
        return self.generation.requests[self.segments[-1]]

    # ----------------------------------------------------------------- following events
    def accept(self, event: Event) -> List[Piece]:
        """Take one event of the current engine request; returns what the answer gains (empty once done)."""
        if self.done:
            return []
        if event.token is not None:
            return self._token(event)
        return self._finish_event(event)

    def _token(self, event: Event) -> List[Piece]:
        now = time.perf_counter()
        if self.first_token_at is None:  # when the engine produced it (events reach the loop in batches)
            self.first_token_at = self.request.first_token_at or now
        if self.rules.n_predict == 0:  # the prompt is in the cache now: nothing to answer
            self._end("limit")
            return []
        self.tokens.append(event.token)
        token_text = self._texts.push(event.token)
        probs = self._probs(event, token_text) if self.rules.n_probs else None
        text, indented_out = self._add(event.text)
        if indented_out:
            self._end("limit")
        elif ("\n" in text and self.rules.t_max_predict_ms > 0
              and (now - self.first_token_at) * 1000 > self.rules.t_max_predict_ms):
            self._end("limit")
        return [Piece(text, event.token, probs)]

    def _finish_event(self, event: Event) -> List[Piece]:
        text, indented_out = self._add(event.text)
        pieces = [Piece(text, None)] if text else []
        if indented_out:
            self._end("limit")
            return pieces
        r = self.request
        if event.finish_reason == "length":
            context_full = self.rules.n_predict < 0 or len(self.tokens) < self.rules.n_predict
            if context_full:
                self.truncated = True
                if self.rules.context_shift and self._shift():
                    return pieces
            self._end("limit", cut=False)
        else:  # "stop": a stop token, or a stop string (the engine cut the text before it)
            produced = self.prompt.decode(r.tokens)
            word = next((s for s in r.params.stop if s in produced), "")
            self.stopping_word = word
            self._end("word" if word else "eos", cut=False)
        return pieces

    def _add(self, text: str) -> Tuple[str, bool]:
        """Add ``text`` to the answer, cut before the first new line (after the answer's first) indented less
        than ``n_indent`` characters (blank counts as 0); returns the part of ``text`` kept and whether such a
        line was found. A line is judged when its first character other than a space or tab arrives."""
        full, cut = self.text + text, None
        if self.rules.n_indent > 0:
            newline = full.rfind("\n", 0, len(self.text))  # lines before it were judged already
            newline = newline if newline != -1 else full.find("\n")
            while newline != -1 and cut is None:
                i = newline + 1
                while i < len(full) and full[i] in " \t":
                    i += 1
                if i < len(full) and i - (newline + 1) < self.rules.n_indent:
                    cut = newline
                newline = full.find("\n", newline + 1)
        kept = text if cut is None else full[len(self.text):cut] if cut >= len(self.text) else ""
        self.has_new_line = self.has_new_line or "\n" in kept
        self.text = full if cut is None else full[:cut]  # (streamed: what was sent already stays sent)
        return kept, cut is not None

    def _probs(self, event: Event, token_text: str) -> dict:
        """llama.cpp's entry of ``completion_probabilities``: the token, its log-probability, its likeliest
        alternatives (the model's distribution before sampling)."""
        def entry(token: int, text: str, logprob: float) -> dict:
            return {"id": token, "token": text, "bytes": list(text.encode()), "logprob": logprob}

        out = entry(event.token, token_text, event.logprob)
        out["top_logprobs"] = [entry(t, self.service.shown_bytes(t).decode("utf-8", errors="ignore"), v)
                               for t, v in (event.top_logprobs or [])]
        self.probs.append(out)
        return out

    def _shift(self) -> bool:
        """Continue past a full context, as llama.cpp's context shift: keep ``n_keep`` tokens (+ BOS), drop
        ``n_discard`` (default: half of the rest) and go on in a new request. False when nothing can be dropped."""
        r, n_ctx = self.request, self.service.context_length
        context = list(self.generation.prompts[self.segments[-1]].ids) + list(r.tokens)
        n_keep = len(self.prompt.ids) if self.rules.n_keep < 0 else self.rules.n_keep
        n_keep = min(n_ctx - 4, n_keep + (1 if context[:1] == [self.service.tokenizer.bos_id] else 0))
        n_left = len(context) - n_keep
        n_discard = min(self.rules.n_discard or n_left // 2, n_left - 1)
        if n_discard <= 0:
            return False
        left = None if self.rules.n_predict < 0 else self.rules.n_predict - len(self.tokens)
        shifted = dataclasses.replace(self.prompt, ids=context[:n_keep] + context[n_keep + n_discard:])
        params: SamplingParams = dataclasses.replace(r.params, max_tokens=left)
        self.segments.append(self.generation.add(shifted, params))
        return True

    def _end(self, stop_type: str, cut: bool = True) -> None:
        """Finish the answer; ``cut``: the engine request is still running and is stopped here."""
        self.stop_type, self.done = stop_type, True
        self.finished_at = (None if cut else self.request.finished_at) or time.perf_counter()
        if cut:
            self.generation.cut(self.segments[-1])

    # ----------------------------------------------------------------- results
    def timings(self) -> dict:
        """llama.cpp's ``timings``: prompt tokens reused (``cache_n``) and evaluated (``prompt_n``), new tokens
        (``predicted_n``), each with milliseconds, ms per token and tokens per second."""
        first = self.generation.requests[self.segments[0]]
        end = self.finished_at or time.perf_counter()
        started = self.first_token_at or end
        cached = first.cached_tokens
        prompt_n, predicted_n = len(self.prompt.ids) - cached, len(self.tokens)
        prompt_ms, predicted_ms = (started - first.submitted) * 1000, (end - started) * 1000
        return {"cache_n": cached,
                "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0}

    def chunk(self, piece: Piece) -> dict:
        """A streamed piece, as llama.cpp sends one per token."""
        out = {"index": self.index, "content": piece.text, "tokens": [] if piece.token is None else [piece.token],
               "stop": False, "id_slot": self.request.slot, "tokens_predicted": len(self.tokens),
               "tokens_evaluated": len(self.prompt.ids)}
        if piece.probs is not None:
            out["completion_probabilities"] = [piece.probs]
        return out

    def final(self, model: str, streamed: bool) -> Dict[str, Any]:
        """llama.cpp's final result (streamed: without the content and tokens already sent)."""
        out = {"index": self.index, "content": "" if streamed else self.text,
               "tokens": [] if streamed or not self.rules.return_tokens else list(self.tokens),
               "id_slot": self.request.slot, "stop": True, "model": model,
               "tokens_predicted": len(self.tokens), "tokens_evaluated": len(self.prompt.ids),
               "generation_settings": self.rules.settings or {}, "prompt": self.service.render(self.prompt.ids),
               "has_new_line": self.has_new_line, "truncated": self.truncated, "stop_type": self.stop_type,
               "stopping_word": self.stopping_word,
               "tokens_cached": self.generation.requests[self.segments[0]].cached_tokens,
               "timings": self.timings()}
        if self.rules.n_probs and not streamed:
            out["completion_probabilities"] = self.probs
        return out


def select_fields(result: Dict[str, Any], fields: List[str]) -> Dict[str, Any]:
    """Only the listed fields of a result, a nested one under its path (``timings/prompt_n``), as llama.cpp's
    ``response_fields``; a field that is not there is left out. No fields: the whole result."""
    if not fields:
        return result
    out = {}
    for path in fields:
        value: Any = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out
