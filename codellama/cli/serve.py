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

from ..build import build
from ..checkpoint import BUNDLED_CKPT_DIR
from ..options import ENGINE_FLAGS, LOAD_FLAGS, HelpFormatter, add_flag, add_flags, engine_options, load_options
from ..serve.app import MAX_BODY_BYTES, server
from ..serve.service import CHAT_FORMATS, ModelService
from . import error_line

log = logging.getLogger("codellama.serve")


def parser(prog: str = "python -m codellama.serve") -> argparse.ArgumentParser:
    """The library's load and engine flags (the examples' spelling ``--ckpt_dir`` and ``--ckpt-dir`` alike),
    with a server's defaults, plus the server's own."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_flags(p, LOAD_FLAGS + ENGINE_FLAGS, max_waiting=64)
    add_flag(p, "host", "address to bind (127.0.0.1: this machine only)", default="127.0.0.1")
    add_flag(p, "port", "0: any free port (printed at start)", type=int, default=8000)
    add_flag(p, "api_key", "require 'Authorization: Bearer KEY' on every request (unset: $CODELLAMA_API_KEY, "
                           "which keeps it out of `ps`)")
    add_flag(p, "model_name", "the name clients send as 'model' (unset: the checkpoint directory's name, lowercased; "
                              "'codellama-tiny' for the bundled model)")
    add_flag(p, "chat_format", "instruct format: auto (from the tokenizer), inst ([INST]), step (70B-Instruct), none",
             default="auto", choices=CHAT_FORMATS)
    add_flag(p, "max_body_bytes", "largest request body accepted (past it: 413)", type=int, default=MAX_BODY_BYTES)
    return p


def default_name(ckpt_dir: Optional[str]) -> str:
    if ckpt_dir is None:
        return "codellama-tiny"
    return os.path.basename(os.path.normpath(ckpt_dir)).lower()


def build_service(args: argparse.Namespace) -> ModelService:
    """Load the model and put an engine with the server's queue bound over it."""
    built = build(load_options(args), engine_options(args))
    return ModelService(built.engine, built.tokenizer, args.model_name or default_name(args.ckpt_dir),
                        chat_format=args.chat_format)


def main(argv: Optional[List[str]] = None, prog: str = "python -m codellama.serve") -> None:
    args = parser(prog).parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get("CODELLAMA_API_KEY")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        service = build_service(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
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

