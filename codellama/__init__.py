"""codellama: a minimal, readable, fast PyTorch implementation of Meta's Code Llama models."""

from .checkpoint import load_model, open_checkpoint
from .config import PRESETS, ModelArgs
from .generation import Llama, TextStream
from .model import KVCache, Transformer
from .save import convert_checkpoint
from .tokenizer import Tokenizer

__all__ = ["Llama", "TextStream", "ModelArgs", "PRESETS", "Transformer", "KVCache", "Tokenizer", "load_model",
           "open_checkpoint", "convert_checkpoint"]
__version__ = "0.1.0"
