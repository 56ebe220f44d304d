"""Serve a Code Llama checkpoint over HTTP (OpenAI, Ollama and llama.cpp protocols).

    python -m codellama.serve                                   # the bundled tiny model, http://127.0.0.1:8000
    python -m codellama.serve --ckpt_dir CodeLlama-7b/ --max_seq_len 4096 --api-key KEY
    torchrun --nproc_per_node 4 -m codellama.serve --ckpt_dir CodeLlama-34b/   # tensor parallel, one per shard

Under torchrun rank 0 serves HTTP and schedules; the other ranks run its steps and leave when it stops
(SIGINT/SIGTERM to torchrun, which passes it on: only rank 0 acts on it). The API key may also come from the
environment (CODELLAMA_API_KEY), which keeps it out of `ps`; an empty key is refused.

Who may use it: requests naming another Host than the bound address's (DNS rebinding) and requests from web
pages of other origins are refused unless --allowed-hosts / --cors-origins name them; each connection must send
its request within --read_timeout seconds, and past --max_connections the longest-idle connection is closed.
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
from ..generation import BUNDLED_CONTEXT_LEN, Llama
from ..ops import ATTENTION_CHOICES
from ..runtime import DTYPES
from ..speculative import SPECULATE_CHOICES
from .app import MAX_BODY_BYTES, server
from .connections import READ_TIMEOUT_S, bind_socket
from .security import check_api_key, check_origins
from .service import CHAT_FORMATS, ModelService

API_KEY_ENV = "CODELLAMA_API_KEY"
DEFAULT_MAX_SEQ_LEN = 2048

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
    p.add_argument("--max_seq_len", "--max-seq-len", type=int, default=None,
                   help=f"context length of each slot (default: {DEFAULT_MAX_SEQ_LEN}; {BUNDLED_CONTEXT_LEN}, the "
                        "context it was trained on, for the bundled model)")
    p.add_argument("--max_waiting", "--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; past it: 503 with Retry-After")
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (or 'X-Api-Key: KEY') on every request (default: "
                        f"${API_KEY_ENV}); an empty key is refused")
    p.add_argument("--allowed-hosts", "--allowed_hosts", dest="allowed_hosts", action="append", default=[],
                   metavar="NAMES", help="more Host names to answer to, comma-separated (.example.com: a domain and "
                                         "its subdomains; *: any); by default only the bound address's (and "
                                         "localhost's for a loopback or 0.0.0.0 bind, any IP address for 0.0.0.0)")
    p.add_argument("--cors-origins", "--cors_origins", dest="cors_origins", action="append", default=[],
                   metavar="ORIGINS", help="web page origins allowed to call the server, comma-separated "
                                           "(e.g. http://localhost:3000; *: any); other pages' requests are refused")
    p.add_argument("--read_timeout", "--read-timeout", type=float, default=READ_TIMEOUT_S,
                   help="seconds a connection has to send a whole request (after connecting or its last response)")
    p.add_argument("--max_connections", "--max-connections", type=int, default=None,
                   help="open connections before the longest-idle one is closed for a new one (default: what "
                        "RLIMIT_NOFILE leaves room for, at most 4096)")
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
    return p


def default_name(ckpt_dir: Optional[str]) -> str:
    if ckpt_dir is None:
        return "codellama-tiny"
    return os.path.basename(os.path.normpath(ckpt_dir)).lower()


def build_service(args: argparse.Namespace) -> ModelService:
    """Load the model and put an engine with the server's queue bound over it. The bundled model is served
    as ``Llama`` serves it: answers capped at its default length unless a request gives one, and (unless
    ``--max_seq_len`` says otherwise) the context it was trained on."""
    bundled = args.ckpt_dir is None
    max_seq_len = args.max_seq_len or (BUNDLED_CONTEXT_LEN if bundled else DEFAULT_MAX_SEQ_LEN)
    if bundled and max_seq_len > BUNDLED_CONTEXT_LEN:
        log.warning("the bundled model was trained on %d-token rows: past them its output degrades",
                    BUNDLED_CONTEXT_LEN)
    llama = Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len, args.max_batch_size,
                        device=args.device, dtype=args.dtype, attention=args.attention, compile=args.compile,
                        speculate=args.speculate, draft_ckpt_dir=args.draft_ckpt_dir, max_waiting=args.max_waiting,
                        quantize=quantize_option(args))
    return ModelService(llama.engine, llama.tokenizer, args.model_name or default_name(args.ckpt_dir),
                        chat_format=args.chat_format, default_max_tokens=llama.default_max_gen_len)


def check_access(args: argparse.Namespace) -> None:
    """The access flags checked before anything is loaded: the API key (``--api-key``, else the environment;
    never empty), the allowed hosts and origins (comma-separated lists)."""
    from_flag = args.api_key is not None
    args.api_key = check_api_key(args.api_key if from_flag else os.environ.get(API_KEY_ENV),
                                 "--api-key" if from_flag else f"${API_KEY_ENV}")
    args.allowed_hosts = [h.strip() for given in args.allowed_hosts for h in given.split(",") if h.strip()]
    args.cors_origins = check_origins(o for given in args.cors_origins for o in given.split(",") if o.strip())


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sock = None
    try:
        check_access(args)
        if int(os.environ.get("RANK", "0")) == 0:  # the rank that serves HTTP: its port, before the model loads
            sock = bind_socket(args.host, args.port)
        service = build_service(args)
    except (ValueError, OSError) as e:  # FileNotFoundError among them
        print(f"error: {e}", file=sys.stderr)
        if sock is not None:
            sock.close()
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
        server(service, host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
               allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins, read_timeout=args.read_timeout,
               max_connections=args.max_connections).run(sockets=[sock])
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
