"""Checkpoint formats other than the directory layouts of ``checkpoint.py``, each read into Meta's names here.

``gguf``: llama.cpp's single-file format (weights, configuration and tokenizer in one file);
``gguf_tokenizer``: the SentencePiece model a GGUF file's vocabulary stands for. Nothing is imported here:
the ``gguf`` package they need is an optional extra (``pip install -e '.[gguf]'``).
"""
