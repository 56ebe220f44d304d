"""Tiny random models and checkpoints, and a scripted stand-in model, for tests and benchmarks (no downloads).

Random weights with Meta's names; norms random too, so a mis-mapped norm cannot hide behind all-ones.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import build_on_meta
from .config import ModelArgs
from .formats.hf import save_hf
from .formats.meta import save_meta
from .model import Transformer, _Step


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights for ``args`` (Meta names), scaled like an initialised model so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in build_on_meta(args).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)
    return {k: v.to(dtype) for k, v in sd.items()}


def random_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A ``Transformer`` holding ``random_state_dict(args, seed, dtype)``, in eval mode."""
    model = build_on_meta(args)
    model.load_state_dict(random_state_dict(args, seed, dtype), assign=True, strict=True)
    return model.eval()


def write_checkpoint(path: str | os.PathLike, args: ModelArgs, layout: str = "meta", *, seed: int = 0,
                     shards: int = 1, dtype: torch.dtype = torch.float32, tokenizer: Optional[str] = None,
                     max_shard_bytes: int = 5 * 2**30) -> str:
    """A random checkpoint directory in the Meta or HF layout (with an optional tokenizer.model copied in)."""
    path = os.fspath(path)
    sd = random_state_dict(args, seed, dtype)
    if layout == "meta":
        save_meta(sd, args, path, num_shards=shards)
    else:
        save_hf(sd, args, path, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return path


class ScriptedModel(Transformer):
    """A stand-in ``Transformer`` that writes given answers: a model one can score a harness against.

    ``scripts`` are ``(prompt, answer)`` token lists. Wherever the tokens a row holds so far are a
    prompt followed by the start of its answer, the logits put all the weight (+100, the rest 0) on
    the answer's next token, and on ``eos_id`` once the answer is written; anywhere else, on ``eos_id``.
    Greedy decoding, and sampling at any temperature with ``top_p < 1``, thus write exactly the answer.

    It keeps what it has seen where a model keeps it: each position's token id is written into its KV
    cache (the keys of its single layer) at the row and position the caller gives, and the next token is
    looked up from that row's cache. So whatever drives it (the engine's slots, prefix reuse, chunked
    prefill, ragged batches) must feed every row the right tokens at the right positions, or the answer
    goes wrong. Only the layers are replaced: ``forward`` and its checks are the ``Transformer``'s own.
    """

    def __init__(self, scripts: Iterable[Tuple[Sequence[int], Sequence[int]]], vocab_size: int, eos_id: int):
        super().__init__(ModelArgs(dim=2, n_layers=1, n_heads=1, vocab_size=vocab_size, multiple_of=1))
        self.eos_id = eos_id
        self._texts: List[List[int]] = []  # prompt + answer + [eos]
        self._index: Dict[int, List[Tuple[int, int]]] = {}  # hash of the first L tokens -> (text, L)
        for prompt, answer in scripts:
            text = [int(t) for t in prompt] + [int(t) for t in answer] + [eos_id]
            for length in range(len(prompt), len(text)):
                key = hash(tuple(text[:length]))
                for other, n in self._index.get(key, ()):
                    if n == length and self._texts[other][:n] == text[:n] and self._texts[other][n] != text[n]:
                        raise ValueError(f"two scripts continue the same {n} tokens differently")
                self._index.setdefault(key, []).append((len(self._texts), length))
            self._texts.append(text)

    def next_token(self, seen: List[int]) -> int:
        """The token the scripts write after ``seen`` (``eos_id`` where none continues it)."""
        for i, n in self._index.get(hash(tuple(seen)), ()):
            if n == len(seen) and self._texts[i][:n] == seen:
                return self._texts[i][n]
        return self.eos_id

    def run(self, tokens: torch.Tensor, step: _Step, logits_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """Logits as :meth:`Transformer.run` gives them ((B, T or 1, V), float32), from the scripts."""
        if step.cache is None:
            raise ValueError("ScriptedModel reads what it has seen from a KV cache: give it one (setup_cache)")
        if step.cache.k.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ScriptedModel keeps token ids in its cache, which needs float32, not {step.cache.k.dtype}")
        B, T = tokens.shape
        rows = step.row_index if step.row_index is not None else torch.arange(step.first_row, step.first_row + B)
        rows = rows.to(tokens.device)
        positions = step.positions.expand(B, T)  # (B, T)
        seen = step.cache.k[0, :, 0, :, 0]  # (slots, max_seq_len): one token id per position
        seen[rows.unsqueeze(1), positions] = tokens.to(seen.dtype)
        if logits_index is None:
            wanted = torch.arange(T).expand(B, T)
        elif isinstance(logits_index, int):
            wanted = torch.full((B, 1), logits_index % T)
        else:
            wanted = logits_index.view(B, 1).cpu()
        logits = torch.zeros(B, wanted.shape[1], self.args.vocab_size)
        for b in range(B):
            row = seen[int(rows[b])]
            for j, t in enumerate(wanted[b].tolist()):
                end = int(positions[b, t]) + 1
                logits[b, j, self.next_token(row[:end].long().tolist())] = 100.0
        return logits.to(tokens.device)
