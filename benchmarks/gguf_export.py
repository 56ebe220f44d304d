"""A Meta-layout state dict as a GGUF file for llama.cpp (architecture "llama"), for the benchmarks that run
llama.cpp on the same weights as this library (``bench_quant.py``, ``bench_serve.py``, ``bench_editor.py``).
Needs the ``gguf`` package (the ``gguf`` extra).

Meta's q/k layout is llama.cpp's own (adjacent channel pairs rotate together), so no permutation is needed
(Hugging Face checkpoints are permuted back by llama.cpp's ``convert_hf_to_gguf.py``; this skips that round
trip). Matrices are F32, or BF16 when the state is bf16; norms are always F32, as llama.cpp requires. The
writer is ``codellama.testing.write_gguf``, which the GGUF tests and ``bench_gguf.py`` use too.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from codellama import ModelArgs
from codellama.testing import write_gguf as _write

Maker = Callable[[], torch.Tensor]


class _Made(Mapping):
    """``state`` with each function called when its tensor is asked for (once: the writer asks once)."""

    def __init__(self, state: Mapping[str, Union[torch.Tensor, Maker]]):
        self.state = state

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.state[key]
        return value() if callable(value) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def write_gguf(path: str, state: Mapping[str, Union[torch.Tensor, Maker]], args: ModelArgs,
               tokenizer_path: Optional[str] = None, context: int = 4096, bf16: Optional[bool] = None) -> None:
    """Write ``state`` (Meta names) to ``path``. The vocabulary is ``tokenizer_path``'s SentencePiece pieces, or
    without one unk/bos/eos, the 256 byte pieces and fillers (enough when token ids are what is fed).

    A value of ``state`` may be a function that makes its tensor: it is called once, when that tensor is
    written, so a model larger than memory streams through (``bf16`` then says the matrices' dtype)."""
    if bf16 is None:
        first = next(iter(state.values()))
        bf16 = (first() if callable(first) else first).dtype == torch.bfloat16
    _write(path, _Made(state), args, tokenizer_path=tokenizer_path, tensor_type="BF16" if bf16 else "F32",
           context=context)
