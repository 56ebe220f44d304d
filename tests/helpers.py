"""Model shapes the tests share (the random models and checkpoints themselves come from ``codellama.testing``),
and the benchmark scripts as modules."""

import importlib
import sys
from pathlib import Path

from codellama import ModelArgs
from codellama.testing import random_model, random_state_dict, write_checkpoint  # noqa: F401 (re-exported)

# Small shapes that still exercise MHA, GQA, odd sizes and Code Llama's rope_theta.
CONFIGS = {
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=101, multiple_of=16),
    "gqa": ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=260, multiple_of=32, rope_theta=1e6),
    "odd": ModelArgs(dim=120, n_layers=2, n_heads=5, n_kv_heads=1, vocab_size=333, multiple_of=7,
                     ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=1e6),
}


def benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)
