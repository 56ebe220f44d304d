"""codellama: a minimal, readable, fast PyTorch implementation of Meta's Code Llama models."""

from .checkpoint import load_model
from .formats import open_checkpoint
from .config import PRESETS, ModelArgs
from .engine import Engine, EngineFull, Event, Request, SamplingParams
from .generation import ChatPrediction, CompletionPrediction, InfillingPrediction, Llama
from .model import KVCache, Transformer
from .prompts import Dialog, Message, Role
from .save import convert_checkpoint
from .tokenizer import TextStream, Tokenizer

__all__ = ["Llama", "CompletionPrediction", "InfillingPrediction", "ChatPrediction", "Dialog", "Message", "Role",
           "Engine", "EngineFull", "Event", "Request", "SamplingParams", "TextStream", "ModelArgs", "PRESETS",
           "Transformer", "KVCache", "Tokenizer", "load_model", "open_checkpoint", "convert_checkpoint"]
__version__ = "0.1.0"
