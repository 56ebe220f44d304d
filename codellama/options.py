"""Every option a user can set, with its default and its check, in one place; and one table of flags for every
program.

Two frozen records describe a run: :class:`LoadOptions` (which weights, where, in which precision) and
:class:`EngineOptions` (how the engine serves them). ``Llama.build``, the server, the evaluator and the
benchmarks fill them and hand them to :func:`codellama.build.build`; each checks its values when created, so
a bad option fails before anything is loaded, with an :class:`OptionError` naming the option.

The command-line programs take the same names as flags (llama.cpp's ``common/arg.cpp`` serves every tool
from one parameter table; :data:`FLAGS` is ours): each flag in both spellings (``--max_seq_len``, as Meta's
examples write it, and ``--max-seq-len``), its default shown by ``--help``, and ``load_options`` /
``engine_options`` turn the parsed flags into the records.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

import torch

from .ops import ATTENTION_CHOICES
from .quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, QuantConfig, QuantizeArg, parse_quantize
from .runtime import DTYPES, parse_dtype, resolve_device

SPECULATE_CHOICES = ("prompt", "draft")


class OptionError(ValueError):
    """A bad value for a named option: ``predicate`` says what is wrong with it (``"must be a positive
    integer"``), or ``text`` is a whole message that already names it. Python shows the option by its keyword
    (``max_seq_len must be a positive integer, got 0``), a program by its flag (``--max_seq_len 0: …``)."""

    def __init__(self, option: str, value: Any, predicate: Optional[str] = None, *, text: Optional[str] = None):
        if text is None:
            text = (f"{option} {predicate}, got {value!r}" if predicate.startswith("must")
                    else f"{option}={value!r} {predicate}")
        super().__init__(text)
        self.option, self.value, self.message = option, value, predicate or text

    def for_command_line(self) -> str:
        return f"--{self.option} {self.value}: {self.message}"


@contextlib.contextmanager
def blame(option: str) -> Iterator[None]:
    """Mark the ``ValueError``/``OSError`` raised inside as caused by ``option``'s value (its ``option``
    attribute), so that a program names the flag; the exception itself is unchanged."""
    try:
        yield
    except (ValueError, OSError) as e:
        if getattr(e, "option", None) is None:
            e.option = option
        raise


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive(name: str, value: Any, *, none: bool = False, zero: bool = False) -> None:
    if value is None and none:
        return
    if not _is_int(value) or value < (0 if zero else 1):
        what = "a non-negative" if zero else "a positive"
        raise OptionError(name, value, f"must be {what} integer{' or None' if none else ''}")


def _checked(name: str, value: Any, check: Callable[[Any], Any]) -> Any:
    """``check(value)``, its ``ValueError`` re-raised as this option's ``OptionError``."""
    try:
        return check(value)
    except OptionError:
        raise
    except ValueError as e:
        raise OptionError(name, value, text=str(e)) from None


# ----------------------------------------------------------------------------- the records
@dataclass(frozen=True)
class LoadOptions:
    """Which weights to load, where, and how they are stored in memory.

    ``ckpt_dir`` None is the tiny model bundled with the package; ``tokenizer_path`` defaults to the
    checkpoint's ``tokenizer.model``; ``device``/``dtype`` default to CUDA/bf16 where available, else
    CPU/fp32; ``attention`` picks the kernels (``"auto"``: Triton on CUDA); ``quantize`` (``"int8"``, ``"int4"``
    or a ``QuantConfig``, with ``group_size`` for int4) quantizes the weights as they load;
    ``model_parallel_size`` must equal ``torchrun``'s world size when given.
    """

    ckpt_dir: Optional[str] = None
    tokenizer_path: Optional[str] = None
    device: Union[None, str, torch.device] = None
    dtype: Union[None, str, torch.dtype] = None
    attention: str = "auto"
    quantize: QuantizeArg = None
    group_size: Optional[int] = None
    model_parallel_size: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("ckpt_dir", "tokenizer_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise OptionError(name, value, "must be a path")
            object.__setattr__(self, name, None if value is None else os.fspath(value))
        _checked("device", self.device, resolve_device)
        _checked("dtype", self.dtype, parse_dtype)
        if self.attention not in ATTENTION_CHOICES:
            raise OptionError("attention", self.attention, text=f"unknown attention implementation {self.attention!r}; "
                                                                f"valid: {', '.join(ATTENTION_CHOICES)}")
        if self.group_size is not None and (self.quantize is None or isinstance(self.quantize, QuantConfig)):
            raise OptionError("group_size", self.group_size, "needs quantize int4 (it sets int4's group size)")
        config = _checked("quantize", self.quantize, lambda q: parse_quantize(
            q if self.group_size is None else QuantConfig(q, self.group_size)))
        object.__setattr__(self, "quantize", config)
        object.__setattr__(self, "group_size", None)
        _positive("model_parallel_size", self.model_parallel_size, none=True)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.dtype)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine serves a model.

    ``max_batch_size`` slots of ``max_seq_len`` positions each; ``max_tokens_per_step`` bounds a step's
    tokens (decode rows first, then prefill chunks: small values keep streams smooth while a long prompt is
    admitted, 64–128 for an editor's server on a CPU); ``max_waiting`` bounds the requests waiting for a slot
    beyond the free ones (None: unbounded); ``compile`` decodes with a ``torch.compile``d static-shape step;
    ``speculate`` is ``"prompt"`` (prompt lookup) or ``"draft"`` (a small model at ``draft_ckpt_dir`` with the
    same tokenizer), proposing up to ``speculate_tokens``; ``seed`` seeds the sampling of requests that
    bring no seed of their own. ``cache_ram_mb`` is the prompt cache's host memory in MiB (None: the engine's
    default, 2048; 0: none) and ``cache_reuse`` > 0 moves cached runs of at least that many prompt tokens to
    new positions instead of computing them (``codellama.engine.prompt_cache``).
    """

    max_seq_len: int = 2048
    max_batch_size: int = 4
    max_tokens_per_step: int = 512
    max_waiting: Optional[int] = None
    compile: bool = False
    speculate: Optional[str] = None
    draft_ckpt_dir: Optional[str] = None
    speculate_tokens: Optional[int] = None
    seed: int = 1
    cache_ram_mb: Optional[float] = None
    cache_reuse: int = 0

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch_size", "max_tokens_per_step"):
            _positive(name, getattr(self, name))
        _positive("max_waiting", self.max_waiting, none=True, zero=True)
        if not isinstance(self.compile, bool):
            raise OptionError("compile", self.compile, "must be True or False")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise OptionError("seed", self.seed, "must be an integer in [0, 2**63)")
        speculate = self.speculate
        if speculate is None and self.draft_ckpt_dir is not None:
            speculate = "draft"
        if speculate is not None and speculate not in SPECULATE_CHOICES:
            raise OptionError("speculate", speculate, f"is not a speculation mode; valid: {', '.join(SPECULATE_CHOICES)} "
                                                      "(or None)")
        if speculate == "draft" and self.draft_ckpt_dir is None:
            raise OptionError("speculate", speculate, "needs draft_ckpt_dir: a small checkpoint with the same "
                                                      "tokenizer")
        if speculate == "prompt" and self.draft_ckpt_dir is not None:
            raise OptionError("draft_ckpt_dir", self.draft_ckpt_dir, "is only used with speculate='draft'")
        if speculate is not None and self.compile:
            raise OptionError("speculate", speculate, "runs with the eager step: it cannot be combined with compile")
        _positive("speculate_tokens", self.speculate_tokens, none=True)
        _positive("cache_reuse", self.cache_reuse, zero=True)
        mb = self.cache_ram_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 <= mb < float("inf")):
            raise OptionError("cache_ram_mb", mb, "must be a non-negative number of MiB (0: no prompt cache)")
        object.__setattr__(self, "speculate", speculate)
        if self.draft_ckpt_dir is not None:
            object.__setattr__(self, "draft_ckpt_dir", os.fspath(self.draft_ckpt_dir))


# ----------------------------------------------------------------------------- the flags
@dataclass(frozen=True)
class Flag:
    """One command-line flag: its option name (the ``dest``), argparse keywords, and help text."""

    name: str
    help: str
    kwargs: Dict[str, Any]

    def add(self, parser: argparse.ArgumentParser, **overrides: Any) -> None:
        """Add it to ``parser``; ``overrides`` replace its argparse keywords (``default``, ``help``, …)."""
        spellings = [f"--{self.name}"] + ([f"--{self.name.replace('_', '-')}"] if "_" in self.name else [])
        kwargs = {"help": self.help, **self.kwargs, **overrides}
        parser.add_argument(*spellings, dest=self.name, **kwargs)


def _flag(name: str, help: str, **kwargs: Any) -> Flag:
    return Flag(name, help, kwargs)


FLAGS: Dict[str, Flag] = {f.name: f for f in (
    # which weights (LoadOptions)
    _flag("ckpt_dir", "checkpoint directory, Meta or Hugging Face layout (unset: the tiny demonstration model "
                      "bundled with the package)", metavar="DIR"),
    _flag("tokenizer_path", "tokenizer.model (unset: CKPT_DIR/tokenizer.model)", metavar="PATH"),
    _flag("device", "cpu, cuda, cuda:1, mps (unset: the best available)"),
    _flag("dtype", "model dtype (unset: bf16 on CUDA, fp32 on CPU)", choices=sorted(DTYPES)),
    _flag("attention", "kernels for attention, RMSNorm and RoPE (auto: Triton on CUDA)", default="auto",
          choices=ATTENTION_CHOICES),
    _flag("quantize", "weight-only quantization as the checkpoint loads (a quantized checkpoint needs none)",
          choices=SCHEMES),
    _flag("group_size", f"int4 only: inputs per scale (unset: {DEFAULT_GROUP_SIZE})", type=int, choices=GROUP_SIZES),
    # how it is served (EngineOptions)
    _flag("max_seq_len", "context length of each slot (prompt + answer)", type=int, default=2048),
    _flag("max_batch_size", "requests decoded at once (cache slots)", type=int, default=4),
    _flag("max_tokens_per_step", "tokens one engine step may feed (decode rows first, then prefill chunks); "
                                 "smaller keeps streams smooth while a long prompt is admitted", type=int,
          default=512),
    _flag("max_waiting", "requests that may wait for a slot beyond the free ones (0: none wait)", type=int),
    _flag("compile", "decode with a torch.compile'd static-shape step (compiling takes tens of seconds)",
          action="store_true"),
    _flag("speculate", "speculative decoding: prompt lookup, or a draft model (--draft_ckpt_dir); output unchanged",
          choices=SPECULATE_CHOICES),
    _flag("draft_ckpt_dir", "the draft model for --speculate draft (same tokenizer)", metavar="DIR"),
    _flag("speculate_tokens", "longest proposal (unset: 10 for prompt lookup, 6 for a draft)", type=int),
    _flag("seed", "seed of the sampling of requests without their own", type=int, default=1),
    _flag("cache_ram_mb", "host memory for prompts kept beyond the slots and restored when a prompt starts the same "
                          "way (exact; unset: 2048; 0: none)", type=float, metavar="MIB"),
    _flag("cache_reuse", "move cached runs of at least N prompt tokens found at other positions instead of "
                         "computing them, keys re-rotated (as llama-server's --cache-reuse; not exact; 0: off)",
          type=int, default=0, metavar="N"),
    # generation
    _flag("temperature", "0 is greedy", type=float, default=0.6),
    _flag("top_p", "nucleus sampling: the probability mass kept", type=float, default=0.9),
    _flag("max_gen_len", "new tokens per answer (unset: until the context is full; the bundled model stops "
                         "at 128)", type=int),
)}

LOAD_FLAGS = ("ckpt_dir", "tokenizer_path", "device", "dtype", "attention", "quantize", "group_size")
ENGINE_FLAGS = ("max_seq_len", "max_batch_size", "max_tokens_per_step", "max_waiting", "compile", "speculate",
                "draft_ckpt_dir", "speculate_tokens", "seed", "cache_ram_mb", "cache_reuse")
SAMPLING_FLAGS = ("temperature", "top_p", "max_gen_len")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the usage text's line breaks and shows each default (unless the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str], **defaults: Any) -> None:
    """Add the named flags of :data:`FLAGS` to ``parser``; ``defaults`` gives a program's own defaults (None
    included)."""
    for name in names:
        FLAGS[name].add(parser, **({"default": defaults[name]} if name in defaults else {}))


def add_flag(parser: argparse.ArgumentParser, name: str, help: str, **kwargs: Any) -> None:
    """A program's own flag, spelled both ways as the shared ones are."""
    Flag(name, help, kwargs).add(parser)


def load_options(args: argparse.Namespace, **overrides: Any) -> LoadOptions:
    return _record(LoadOptions, args, overrides)


def engine_options(args: argparse.Namespace, **overrides: Any) -> EngineOptions:
    return _record(EngineOptions, args, overrides)


def split_options(ckpt_dir: Optional[str] = None, **options: Any) -> "tuple[LoadOptions, EngineOptions]":
    """Keyword options (any field of either record) as the two records; an unknown name is an ``OptionError``."""
    load_names, engine_names = ({f.name for f in fields(cls)} for cls in (LoadOptions, EngineOptions))
    unknown = sorted(set(options) - load_names - engine_names)
    if unknown:
        raise OptionError(unknown[0], options[unknown[0]],
                          f"is not an option; valid: {', '.join(sorted(load_names | engine_names))}")
    return (LoadOptions(ckpt_dir=ckpt_dir, **{k: v for k, v in options.items() if k in load_names}),
            EngineOptions(**{k: v for k, v in options.items() if k in engine_names}))


def _record(cls, args: argparse.Namespace, overrides: Dict[str, Any]):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


__all__ = ["LoadOptions", "EngineOptions", "OptionError", "FLAGS", "LOAD_FLAGS", "ENGINE_FLAGS", "SAMPLING_FLAGS",
           "HelpFormatter", "add_flags", "add_flag", "load_options", "engine_options", "split_options",
           "SPECULATE_CHOICES"]
