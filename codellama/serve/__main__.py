"""Serve a Code Llama checkpoint over HTTP (OpenAI, Ollama and llama.cpp protocols).

    python -m codellama.serve                                   # the bundled tiny model, http://127.0.0.1:8000
    python -m codellama.serve --ckpt_dir CodeLlama-7b/ --max_seq_len 4096 --api-key KEY
    torchrun --nproc_per_node 4 -m codellama.serve --ckpt_dir CodeLlama-34b/   # tensor parallel, one per shard

Under torchrun rank 0 serves HTTP and schedules; the other ranks run its steps and leave when it stops
(SIGINT/SIGTERM to torchrun, which passes it on: only rank 0 acts on it). The API key may also come from the environment (CODELLAMA_API_KEY), which keeps it out of `ps`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from typing import List, Optional

from ..checkpoint import BUNDLED_CKPT_DIR
from ..commands import add_quantize_flags, quantize_option, run
from ..generation import Llama
from ..ops import ATTENTION_CHOICES
from ..runtime import DTYPES
from ..engine.prompt_cache import DEFAULT_CACHE_RAM_MB
from ..engine.speculative import SPECULATE_CHOICES
from .app import MAX_BODY_BYTES, server
from .service import CHAT_FORMATS, ModelService

log = logging.getLogger("codellama.serve")


def parser() -> argparse.ArgumentParser:
    """The flags, in the examples' spelling (``--ckpt_dir``) with the dashed spelling accepted too."""
    p = argparse.ArgumentParser(prog="python -m codellama.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", "--ckpt-dir", default=None,
                   help="checkpoint directory, Meta or Hugging Face layout (default: the bundled tiny model)")
    p.add_argument("--tokenizer_path", "--tokenizer-path", default=None, help="default: CKPT_DIR/tokenizer.model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    p.add_argument("--max_batch_size", "--max-batch-size", type=int, default=4, help="requests decoded at once")
    p.add_argument("--max_seq_len", "--max-seq-len", type=int, default=2048, help="context length of each slot")
    p.add_argument("--max_waiting", "--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; past it: 503 with Retry-After")
    p.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("CODELLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $CODELLAMA_API_KEY)")
    p.add_argument("--model_name", "--model-name", default=None,
                   help="the name clients send as 'model' (default: the checkpoint directory's name, lowercased; "
                        "'codellama-tiny' for the bundled model)")
    p.add_argument("--chat_format", "--chat-format", default="auto", choices=CHAT_FORMATS,
                   help="instruct format: auto (from the tokenizer), inst ([INST]), step (70B-Instruct), none")
    p.add_argument("--max_body_bytes", "--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--compile", action="store_true", help="decode with a torch.compiled step (CUDA graphs on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES)
    p.add_argument("--speculate", default=None, choices=SPECULATE_CHOICES,
                   help="speculative decoding: prompt lookup, or a draft model (--draft_ckpt_dir); output unchanged")
    p.add_argument("--draft_ckpt_dir", "--draft-ckpt-dir", default=None,
                   help="the draft model for --speculate draft (same tokenizer)")
    add_quantize_flags(p)
    add_cache_flags(p)
    return p


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """The prompt cache and chunk reuse (``codellama.engine.prompt_cache``), and the infilling order, for editors."""
    p.add_argument("--cache_ram_mb", "--cache-ram-mb", "--cache-ram", type=float, default=DEFAULT_CACHE_RAM_MB,
                   metavar="MIB", help="host memory for prompts kept beyond the slots, restored when a prompt starts "
                   f"the same way (exact); 0: none (default {DEFAULT_CACHE_RAM_MB})")
    p.add_argument("--cache_reuse", "--cache-reuse", type=int, default=0, metavar="N",
                   help="move cached runs of at least N prompt tokens found at other positions instead of "
                        "computing them, keys re-rotated (as llama-server's --cache-reuse; not exact); 0: off")
    p.add_argument("--spm_infill", "--spm-infill", action="store_true",
                   help="lay infilling prompts out suffix first (SPM), so a keystroke only appends to the cached "
                        "prompt (exact for that layout; see docs/server.md for its quality cost)")


def default_name(ckpt_dir: Optional[str]) -> str:
    if ckpt_dir is None:
        return "codellama-tiny"
    return os.path.basename(os.path.normpath(ckpt_dir)).lower()


def build_service(args: argparse.Namespace) -> ModelService:
    """Load the model and put an engine with the server's queue bound over it."""
    llama = Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size,
                        device=args.device, dtype=args.dtype, attention=args.attention, compile=args.compile,
                        speculate=args.speculate, draft_ckpt_dir=args.draft_ckpt_dir, max_waiting=args.max_waiting,
                        quantize=quantize_option(args), cache_ram_mb=args.cache_ram_mb, cache_reuse=args.cache_reuse)
    return ModelService(llama.engine, llama.tokenizer, args.model_name or default_name(args.ckpt_dir),
                        chat_format=args.chat_format, spm_infill=args.spm_infill)


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        service = build_service(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if service.engine.rank != 0:
        # Tensor parallelism: run rank 0's steps until it stops. torchrun hands its signals to every rank;
        # only rank 0 acts on them, so that its stop (which ends in-flight requests) still reaches this rank.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        service.engine.follow()
        return
    if not args.api_key and not _is_loopback(args.host):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", args.host)
    log.info("serving %s (%s, context %d, %d slots, FIM %s, chat %s)", service.name,
             args.ckpt_dir or BUNDLED_CKPT_DIR, service.context_length, args.max_batch_size,
             "yes" if service.can_infill else "no", service.chat_format or "no")
    if service.engine.world > 1:
        # uvicorn re-raises the signal that stopped it; with the default action that would kill rank 0 before
        # it leaves the process group with the others. A handler of our own makes the re-raise a no-op.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    try:
        server(service, host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once everything has stopped
        pass
    finally:
        service.engine.stop()  # under torchrun: releases the other ranks even if the server failed to start


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    run(main)
