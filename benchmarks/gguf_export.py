"""A Meta-layout state dict as a GGUF file for llama.cpp (architecture "llama"), for the benchmarks that run
llama.cpp on the same weights as this library (``bench_quant.py``, ``bench_serve.py``). Needs the ``gguf``
package (the ``gguf`` extra).

Meta's q/k layout is llama.cpp's own (adjacent channel pairs rotate together), so no permutation is needed
(Hugging Face checkpoints are permuted back by llama.cpp's ``convert_hf_to_gguf.py``; this skips that round
trip). Matrices are F32, or BF16 when the state is bf16; norms are always F32, as llama.cpp requires. The
writer is ``codellama.testing.write_gguf``, which the GGUF tests and ``bench_gguf.py`` use too.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from codellama import ModelArgs
from codellama.testing import write_gguf as _write


def write_gguf(path: str, state: Dict[str, torch.Tensor], args: ModelArgs, tokenizer_path: Optional[str] = None,
               context: int = 4096) -> None:
    """Write ``state`` (Meta names) to ``path``. The vocabulary is ``tokenizer_path``'s SentencePiece pieces, or
    without one unk/bos/eos, the 256 byte pieces and fillers (enough when token ids are what is fed)."""
    bf16 = next(iter(state.values())).dtype == torch.bfloat16
    _write(path, state, args, tokenizer_path=tokenizer_path, tensor_type="BF16" if bf16 else "F32", context=context)
