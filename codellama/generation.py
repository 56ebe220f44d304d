"""The reference-compatible ``Llama`` API: completion, infilling, instruct chat, and their streaming forms.

Same signatures and results as Meta's ``Llama``. How it differs (also listed in the README, "Differences
from Meta's reference"): it runs in a plain Python process (no ``torchrun``, no process group), prefills a
ragged batch in one pass and decodes each row at its own position, with finished rows leaving the batch
(invisible in the results); infilling stops at EOS as well as at ``<EOT>``; a dialog that contains the
format's special tags is not run, so its result holds the error message with no tokens or logprobs;
sampling draws from the ``Llama``'s own seeded generator, not torch's global one.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from .build import BUNDLED_MAX_GEN_LEN, Built, build
from .checkpoint import BUNDLED_CKPT_DIR, check_tokenizer
from .engine import Engine, SamplingParams
from .model import Transformer
from .options import EngineOptions, LoadOptions
from .quantize import QuantizeArg
from .prompts import (UNSAFE_ERROR, Dialog, Message, chat_prompt_tokens, chat_stop_ids, has_special_tags,
                      infilling_prompt_tokens, step_dialog_prompt_tokens, validate_dialog)
from .tokenizer import Tokenizer

StopTokens = Union[None, int, Iterable[int]]


class CompletionPrediction(TypedDict, total=False):
    """One result of ``text_completion`` (``tokens`` and ``logprobs`` with ``logprobs=True``), as Meta's."""

    generation: str
    tokens: List[str]
    logprobs: List[float]


class InfillingPrediction(CompletionPrediction, total=False):
    """One result of ``text_infilling``: the middle, and ``prefix + middle + suffix``."""

    full_text: str


class ChatPrediction(TypedDict, total=False):
    """One result of ``chat_completion``."""

    generation: Message
    tokens: List[str]
    logprobs: List[float]

DEFAULT_CKPT_DIR = BUNDLED_CKPT_DIR  # the name earlier releases used


class Llama:
    """A model and its tokenizer, with the generation methods of Meta's ``Llama`` class.

    Every method is a client of one :class:`~codellama.engine.Engine`: it submits requests and waits for
    them, so calls from many threads at once are batched together and each gets exactly what it gets
    alone. ``llama.engine.start()`` runs the engine on a background thread (servers).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int = 2048, max_batch_size: int = 4,
                 seed: int = 1, *, compile: bool = False, max_tokens_per_step: int = 512, speculator=None,
                 max_waiting: Optional[int] = None, engine: Optional[Engine] = None):
        """``engine``: serve through this engine (``codellama.build.build`` made it); otherwise one is made here
        from the other arguments."""
        check_tokenizer(model.args, tokenizer.n_words, tokenizer.model_path)
        if engine is None:
            options = EngineOptions(max_seq_len=max_seq_len, max_batch_size=max_batch_size, seed=seed,
                                    compile=compile, max_tokens_per_step=max_tokens_per_step, max_waiting=max_waiting)
            engine = Engine(model, tokenizer, max_batch_size=options.max_batch_size, max_seq_len=options.max_seq_len,
                            seed=options.seed, compile=options.compile, speculator=speculator,
                            max_tokens_per_step=options.max_tokens_per_step, max_waiting=options.max_waiting)
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.max_seq_len = engine.max_seq_len
        self.max_batch_size = engine.max_batch_size
        self.device = model.tok_embeddings.weight.device
        self.default_max_gen_len: Optional[int] = None  # what max_gen_len=None means (None: max_seq_len - 1)

    @staticmethod
    def build(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, max_seq_len: int = 2048,
              max_batch_size: int = 4, model_parallel_size: Optional[int] = None, *,
              device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
              seed: int = 1, attention: str = "auto", compile: bool = False, speculate: Optional[str] = None,
              draft_ckpt_dir: Optional[str] = None, speculate_tokens: Optional[int] = None,
              max_waiting: Optional[int] = None, quantize: QuantizeArg = None,
              max_tokens_per_step: int = 512, cache_ram_mb: Optional[float] = None,
              cache_reuse: int = 0) -> "Llama":
        """Load a checkpoint (Meta or Hugging Face layout) and its tokenizer.

        Positional arguments are the reference's. ``ckpt_dir=None`` uses the tiny model bundled with the
        package; ``tokenizer_path`` defaults to ``ckpt_dir/tokenizer.model`` (a GGUF file's own vocabulary).
        Runs in a plain process on CPU, CUDA or MPS; ``device``/``dtype`` default to CUDA/bf16 where
        available, else CPU/fp32.
        ``attention`` picks the kernels: ``"auto"`` (Triton on CUDA), ``"torch"`` or ``"triton"``.
        ``compile=True`` decodes with a ``torch.compile``d static-shape step (CUDA graphs on CUDA).
        ``speculate="prompt"`` (prompt lookup) or ``"draft"`` (``draft_ckpt_dir``: a small model with the same
        tokenizer) turns on speculative decoding, which never changes what is generated;
        ``speculate_tokens`` is the longest proposal. ``max_waiting`` bounds the engine's queue (servers);
        ``max_tokens_per_step`` bounds the tokens of one engine step (smaller keeps streams smooth while a
        long prompt is admitted). ``cache_ram_mb`` and ``cache_reuse`` set the prompt cache and chunk reuse
        (``codellama.engine.prompt_cache``). ``quantize="int8"`` or ``"int4"`` (or a ``codellama.quantize.QuantConfig``)
        quantizes the weights as they load (weight-only; a checkpoint written by ``python -m
        codellama.quantize`` loads quantized without it). Every option is described, with its check, in
        :mod:`codellama.options`.
        Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is split across the ranks (tensor parallelism,
        ``model_parallel_size`` defaulting to the world size): each rank joins the process group, takes
        its GPU (``LOCAL_RANK``) and loads only its slices, whatever the checkpoint's shard count.
        """
        load = LoadOptions(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, device=device, dtype=dtype,
                           attention=attention, quantize=quantize, model_parallel_size=model_parallel_size)
        options = EngineOptions(max_seq_len=max_seq_len, max_batch_size=max_batch_size, seed=seed, compile=compile,
                                speculate=speculate, draft_ckpt_dir=draft_ckpt_dir, speculate_tokens=speculate_tokens,
                                max_waiting=max_waiting, max_tokens_per_step=max_tokens_per_step,
                                cache_ram_mb=cache_ram_mb, cache_reuse=cache_reuse)
        return Llama.from_built(build(load, options))

    @staticmethod
    def from_built(built: Built) -> "Llama":
        """The ``Llama`` over what :func:`codellama.build.build` made."""
        llama = Llama(built.model, built.tokenizer, engine=built.engine)
        # As in Meta's reference, generator.model.forward(tokens, start_pos) reads and writes a KV cache of
        # max_batch_size × max_seq_len; it is allocated by the first such forward, not here. (Generation
        # uses the engine's own slot cache.)
        built.model.setup_cache(built.options.max_batch_size, built.options.max_seq_len, lazy=True)
        if built.bundled:
            llama.default_max_gen_len = BUNDLED_MAX_GEN_LEN
        return llama

    # ------------------------------------------------------------------ token-level API
    def generate(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int], temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, stop_token: StopTokens = None, *,
                 top_k: Optional[int] = None) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate from token prompts; returns ``(tokens, logprobs)`` per prompt as the reference does.

        Each row stops at a stop token (default EOS; not included in the output), after ``max_gen_len``
        tokens (None: ``max_seq_len - 1``), or at ``max_seq_len`` positions (a larger ``max_gen_len`` is
        clamped to the room left, as the reference does). ``echo`` prepends the prompt (and, with
        ``logprobs``, its token log-probabilities, 0.0 for the first token). ``stop_token`` may be an id or
        several ids.
        """
        self._check_prompts(prompt_tokens)
        params = self._params(max_gen_len, temperature, top_p, top_k, stop_token, logprobs, logprobs and echo)
        requests = [self.engine.submit(p, params, text=False) for p in prompt_tokens]
        try:
            for r in requests:
                r.result()
        finally:
            for r in requests:
                r.cancel()  # a no-op for finished requests; frees the slots if we are interrupted
        out = [(list(p) if echo else []) + r.tokens for p, r in zip(prompt_tokens, requests)]
        if not logprobs:
            return out, None
        return out, [(r.prompt_logprobs if echo else []) + r.logprobs for r in requests]

    def _params(self, max_gen_len: Optional[int], temperature: float, top_p: float, top_k: Optional[int],
                stop_token: StopTokens, logprobs: bool = False, prompt_logprobs: bool = False) -> SamplingParams:
        if max_gen_len is None:  # Meta: until the context is full (the bundled model: its cap)
            max_gen_len = self.default_max_gen_len or self.max_seq_len - 1
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be a non-negative integer or None, got {max_gen_len!r}")
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_gen_len,
                              stop_token_ids=self._stop_ids(stop_token), logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)

    def _check_prompts(self, prompt_tokens: List[List[int]]) -> None:
        if (not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens
                or not all(isinstance(p, (list, tuple)) for p in prompt_tokens)):
            raise ValueError(f"prompt_tokens must be a non-empty list of token-id lists (one per prompt), "
                             f"got {prompt_tokens!r:.80}")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={self.max_batch_size}; "
                             "pass fewer prompts per call or build with a larger max_batch_size")
        vocab = self.model.args.vocab_size
        for i, p in enumerate(prompt_tokens):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (e.g. BOS)")
            if len(p) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_seq_len={self.max_seq_len}")
            bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} holds token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")

    def _stop_ids(self, stop_token: StopTokens) -> Tuple[int, ...]:
        if stop_token is None:
            return (self.tokenizer.eos_id,)
        if isinstance(stop_token, int) and not isinstance(stop_token, bool):
            return (stop_token,)
        try:
            return tuple(stop_token)
        except TypeError:
            raise ValueError(f"stop_token must be a token id, a list of ids or None, got {stop_token!r}") from None

    # ------------------------------------------------------------------ text-level API
    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, *,
                        top_k: Optional[int] = None) -> List[CompletionPrediction]:
        """Continue each prompt: ``[{"generation": str, "tokens"?: [str], "logprobs"?: [float]}]``."""
        _check_strings(prompts, "prompts")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, top_k=top_k)
        return [self._result(self.tokenizer.decode(t), t, lps, i) for i, t in enumerate(tokens)]

    def text_infilling(self, prefixes: List[str], suffixes: List[str], temperature: float = 0.6, top_p: float = 0.9,
                       max_gen_len: Optional[int] = None, logprobs: bool = False, suffix_first: bool = False, *,
                       top_k: Optional[int] = None) -> List[InfillingPrediction]:
        """Fill the middle between each prefix and suffix: ``[{"generation", "full_text", …}]``.

        Stops at ``<EOT>`` (and EOS), neither of which appears in the text; ``full_text`` is
        ``prefix + generation + suffix``. ``suffix_first`` uses the SPM prompt order.
        """
        _check_strings(prefixes, "prefixes")
        _check_strings(suffixes, "suffixes")
        if len(prefixes) != len(suffixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes: they are paired one to one")
        prompt_tokens = [infilling_prompt_tokens(self.tokenizer, p, s, suffix_first) for p, s in zip(prefixes, suffixes)]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                    stop_token=self._infill_stops(), top_k=top_k)
        results = []
        for i, (t, prefix, suffix) in enumerate(zip(tokens, prefixes, suffixes)):
            generation = self.tokenizer.decode_infilling(t)
            results.append({**self._result(generation, t, lps, i), "full_text": prefix + generation + suffix})
        return results

    def chat_completion(self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, *,
                        top_k: Optional[int] = None) -> List[ChatPrediction]:
        """Answer each dialog: ``[{"generation": {"role": "assistant", "content": str}, …}]``.

        Uses the ``[INST]`` format, or the 70B-Instruct ``<step>`` format when the tokenizer has ``<step>``.
        A dialog whose messages contain the format's special tags is not run; its answer is the
        reference's error message.
        """
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise ValueError("dialogs must be a non-empty list of dialogs (lists of messages)")
        for i, d in enumerate(dialogs):
            validate_dialog(d, i)
        safe = [i for i, d in enumerate(dialogs) if not has_special_tags(d)]
        tokens: List[List[int]] = [[] for _ in dialogs]
        lps: List[List[float]] = [[] for _ in dialogs]
        if safe:
            prompts = [self._chat_prompt(dialogs[i]) for i in safe]
            t, lp = self.generate(prompts, max_gen_len, temperature, top_p, logprobs, stop_token=self._chat_stop(),
                                  top_k=top_k)
            for k, i in enumerate(safe):
                tokens[i] = t[k]
                lps[i] = lp[k] if logprobs else []
        results = []
        for i, t in enumerate(tokens):
            content = self.tokenizer.decode(t) if i in safe else UNSAFE_ERROR
            message = {"role": "assistant", "content": content}
            if self.tokenizer.step_id is not None:
                message["destination"] = "user"
            results.append({**self._result(content, t, lps if logprobs else None, i), "generation": message})
        return results

    # ------------------------------------------------------------------ streaming
    def stream_completion(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                          max_gen_len: Optional[int] = None, *, top_k: Optional[int] = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces; joined, they equal ``text_completion``'s text."""
        _check_strings([prompt], "prompt")
        tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        yield from self._stream(tokens, self.tokenizer.decode, max_gen_len, temperature, top_p, top_k, None)

    def stream_infilling(self, prefix: str, suffix: str, temperature: float = 0.6, top_p: float = 0.9,
                         max_gen_len: Optional[int] = None, suffix_first: bool = False, *,
                         top_k: Optional[int] = None) -> Iterator[str]:
        """Yield the infilled middle as text pieces; joined, they equal ``text_infilling``'s generation."""
        _check_strings([prefix, suffix], "prefix and suffix")
        tokens = infilling_prompt_tokens(self.tokenizer, prefix, suffix, suffix_first)
        yield from self._stream(tokens, self.tokenizer.decode_infilling, max_gen_len, temperature, top_p, top_k,
                                self._infill_stops())

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, *, top_k: Optional[int] = None) -> Iterator[str]:
        """Yield the assistant's answer to one dialog as text pieces."""
        validate_dialog(dialog)
        if has_special_tags(dialog):
            yield UNSAFE_ERROR
            return
        yield from self._stream(self._chat_prompt(dialog), self.tokenizer.decode, max_gen_len, temperature, top_p,
                                top_k, self._chat_stop())

    def _stream(self, prompt: List[int], decode, max_gen_len, temperature, top_p, top_k, stop_token) -> Iterator[str]:
        params = self._params(max_gen_len, temperature, top_p, top_k, stop_token)
        request = self.engine.submit(self.engine.check_prompt(prompt), params, decode=decode)
        events = iter(request)
        try:
            for event in events:
                if event.text:
                    yield event.text
        finally:  # the caller stopped early (or the stream was collected): free the slot
            events.close()

    # ------------------------------------------------------------------ helpers
    def _infill_stops(self) -> List[int]:
        self.tokenizer.require_infilling()
        return [self.tokenizer.eot_id, self.tokenizer.eos_id]

    def _chat_prompt(self, dialog: Dialog) -> List[int]:
        if self.tokenizer.step_id is not None:
            return step_dialog_prompt_tokens(self.tokenizer, dialog)
        return chat_prompt_tokens(self.tokenizer, dialog)

    def _chat_stop(self) -> List[int]:
        return list(chat_stop_ids(self.tokenizer, self.tokenizer.step_id is not None))

    def _result(self, text: str, tokens: List[int], lps: Optional[List[List[float]]], i: int) -> Dict:
        if lps is None:
            return {"generation": text}
        return {"generation": text, "tokens": [self.tokenizer.token_piece(x) for x in tokens], "logprobs": lps[i]}


def _check_strings(items: Sequence, what: str) -> None:
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"{what} must be a list of str, got {items!r:.80}")
