"""Serve a Code Llama checkpoint over HTTP (OpenAI, Ollama and llama.cpp protocols).

    python -m codellama.serve                                   # the bundled tiny model, http://127.0.0.1:8000
    python -m codellama.serve --ckpt_dir CodeLlama-7b/ --max_seq_len 4096 --api-key KEY
    torchrun --nproc_per_node 4 -m codellama.serve --ckpt_dir CodeLlama-34b/   # tensor parallel, one per shard

Under torchrun rank 0 serves HTTP and schedules; the other ranks run its steps and leave when it stops
(SIGINT/SIGTERM to torchrun, which passes it on: only rank 0 acts on it). The API key may also come from the
environment (CODELLAMA_API_KEY), which keeps it out of `ps`; an empty key is refused.

Who may use it: requests naming another Host than the bound address's (DNS rebinding) and requests from web
pages of other origins are refused unless --allowed_hosts / --cors_origins name them; each connection must send
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

from ..build import BUNDLED_CONTEXT_LEN, BUNDLED_MAX_GEN_LEN, build
from ..checkpoint import BUNDLED_CKPT_DIR
from ..options import (ENGINE_FLAGS, FLAGS, LOAD_FLAGS, EngineOptions, HelpFormatter, add_flag, add_flags, engine_options,
                       load_options)
from ..serve.app import MAX_BODY_BYTES, server
from ..serve.connections import READ_TIMEOUT_S, bind_socket
from ..serve.llamacpp_api import Settings
from ..serve.security import check_api_key, check_origins
from ..serve.service import CHAT_FORMATS, ModelService
from . import error_line

API_KEY_ENV = "CODELLAMA_API_KEY"
DEFAULT_MAX_SEQ_LEN = FLAGS["max_seq_len"].kwargs["default"]

log = logging.getLogger("codellama.serve")


def parser(prog: str = "python -m codellama.serve") -> argparse.ArgumentParser:
    """The library's load and engine flags (the examples' spelling ``--ckpt_dir`` and ``--ckpt-dir`` alike),
    with a server's defaults, plus the server's own."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    # The engine's own --seed is not a server flag: the server's --seed is llama-server's (below).
    add_flags(p, LOAD_FLAGS + tuple(f for f in ENGINE_FLAGS if f != "seed"), max_waiting=64, max_seq_len=None)
    add_flag(p, "host", "address to bind (127.0.0.1: this machine only)", default="127.0.0.1")
    add_flag(p, "port", "0: any free port (printed at start)", type=int, default=8000)
    add_flag(p, "api_key", f"require 'Authorization: Bearer KEY' (or 'X-Api-Key: KEY') on every request (unset: "
                           f"${API_KEY_ENV}, which keeps it out of `ps`); an empty key is refused")
    add_flag(p, "allowed_hosts", "more Host names to answer to, comma-separated (.example.com: a domain and its "
                                 "subdomains; *: any); unset: only the bound address's (and localhost's for a "
                                 "loopback or 0.0.0.0 bind, any IP address for 0.0.0.0)", action="append", default=[],
             metavar="NAMES")
    add_flag(p, "cors_origins", "web page origins allowed to call the server, comma-separated (e.g. "
                                "http://localhost:3000; *: any); other pages' requests are refused", action="append",
             default=[], metavar="ORIGINS")
    add_flag(p, "read_timeout", "seconds a connection has to send a whole request (after connecting or its last "
                                "response)", type=float, default=READ_TIMEOUT_S)
    add_flag(p, "max_connections", "open connections before the longest-idle one is closed for a new one (unset: "
                                   "what RLIMIT_NOFILE leaves room for, at most 4096)", type=int)
    add_flag(p, "model_name", "the name clients send as 'model' (unset: the first --alias in sorted order, as "
                              "llama-server; else the checkpoint directory's name, lowercased; 'codellama-tiny' for "
                              "the bundled model)")
    p.add_argument("--alias", "-a", action="append", default=[], metavar="NAMES",
                   help="more names for the model, comma-separated or repeated (llama-server's --alias)")
    add_flag(p, "tags", "tags listed with the model by /models, comma-separated (informational)", action="append",
             default=[], metavar="TAGS")
    add_flag(p, "strict_model_name", "answer a request naming another model with 404 (unset: serve it, as "
                                     "llama-server does: editors send whatever name their configuration holds)",
             action="store_true")
    add_flag(p, "chat_format", "instruct format: auto (from the tokenizer), inst ([INST]), step (70B-Instruct), none",
             default="auto", choices=CHAT_FORMATS)
    add_flag(p, "max_body_bytes", "largest request body accepted (past it: 413)", type=int, default=MAX_BODY_BYTES)
    add_flag(p, "spm_infill", "lay infilling prompts out suffix first (SPM) where the client does not spell the "
                              "order, so that a keystroke only appends to the cached prompt (as llama-server's "
                              "--spm-infill; docs/server.md gives its quality cost)", action="store_true")
    g = p.add_argument_group("llama.cpp endpoints", "defaults of /completion and /infill (llama-server's flags)")
    add_flag(g, "n_predict", "tokens to predict when a request does not say (-1: until the context is full)", type=int,
             default=-1)
    add_flag(g, "temp", "temperature when a request does not say (0: greedy)", type=float, default=0.8)
    add_flag(g, "seed", "seed when a request does not say (-1: a fresh one)", type=int, default=-1)
    add_flag(g, "context_shift", "when the context fills up, drop half of what follows n_keep and go on",
             action="store_true")
    g.add_argument("--slots", action=argparse.BooleanOptionalAction, default=True,
                   help="the read-only GET /slots (default: on)")
    return p


def default_name(ckpt_dir: Optional[str]) -> str:
    if ckpt_dir is None:
        return "codellama-tiny"
    return os.path.basename(os.path.normpath(ckpt_dir)).lower()


def split_names(values: List[str]) -> List[str]:
    """Names given as comma lists, repeated or both, in order, each once."""
    return list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))


def build_service(args: argparse.Namespace) -> ModelService:
    """Load the model and put an engine with the server's queue bound over it. The bundled model is served
    as ``Llama`` serves it: answers capped at its default length unless a request gives one, and (unless
    ``--max_seq_len`` says otherwise) the context it was trained on."""
    bundled = args.ckpt_dir is None
    max_seq_len = args.max_seq_len or (BUNDLED_CONTEXT_LEN if bundled else DEFAULT_MAX_SEQ_LEN)
    if bundled and max_seq_len > BUNDLED_CONTEXT_LEN:
        log.warning("the bundled model was trained on %d-token rows: past them its output degrades",
                    BUNDLED_CONTEXT_LEN)
    aliases = split_names(args.alias)
    name = args.model_name or (sorted(aliases)[0] if aliases else default_name(args.ckpt_dir))
    built = build(load_options(args), engine_options(args, max_seq_len=max_seq_len, seed=EngineOptions.seed))
    return ModelService(built.engine, built.tokenizer, name, chat_format=args.chat_format,
                        default_max_tokens=BUNDLED_MAX_GEN_LEN if bundled else None, aliases=aliases,
                        strict_model_name=args.strict_model_name, tags=split_names(args.tags),
                        spm_infill=args.spm_infill)


def llamacpp_settings(args: argparse.Namespace) -> Settings:
    return Settings(n_predict=args.n_predict, temperature=args.temp, seed=args.seed, context_shift=args.context_shift,
                    slots=args.slots, model_path=os.path.abspath(args.ckpt_dir or BUNDLED_CKPT_DIR))


def check_access(args: argparse.Namespace) -> None:
    """The access flags checked before anything is loaded: the API key (``--api_key``, else the environment;
    never empty), the allowed hosts and origins (comma-separated lists)."""
    from_flag = args.api_key is not None
    args.api_key = check_api_key(args.api_key if from_flag else os.environ.get(API_KEY_ENV),
                                 "--api-key" if from_flag else f"${API_KEY_ENV}")
    args.allowed_hosts = [h.strip() for given in args.allowed_hosts for h in given.split(",") if h.strip()]
    args.cors_origins = check_origins(o for given in args.cors_origins for o in given.split(",") if o.strip())


def main(argv: Optional[List[str]] = None, prog: str = "python -m codellama.serve") -> None:
    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sock = None
    try:
        check_access(args)
        if int(os.environ.get("RANK", "0")) == 0:  # the rank that serves HTTP: its port, before the model loads
            sock = bind_socket(args.host, args.port)
        service = build_service(args)
    except (ValueError, OSError) as e:  # FileNotFoundError among them
        print(f"error: {error_line(e)}", file=sys.stderr)
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
               max_connections=args.max_connections, llamacpp=llamacpp_settings(args)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once everything has stopped
        pass
    finally:
        service.engine.stop()  # under torchrun: releases the other ranks even if the server failed to start


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

