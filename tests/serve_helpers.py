"""Servers for the HTTP tests: in-process, on 127.0.0.1 and an ephemeral port, stopped and joined at the end."""

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from codellama.engine import Engine
from codellama.serve.app import Server, server
from codellama.serve.service import ModelService

MAX_SEQ_LEN = 256
NAME = "codellama-tiny"


def make_service(llama, *, max_batch_size: int = 8, tokenizer=None, chat_format: str = "auto",
                 **engine_kw) -> ModelService:
    """A service with its own engine (and cache) over ``llama``'s model."""
    engine = Engine(llama.model, llama.tokenizer, max_batch_size=max_batch_size, max_seq_len=MAX_SEQ_LEN,
                    **engine_kw)
    return ModelService(engine, tokenizer or llama.tokenizer, NAME, chat_format=chat_format)


@dataclass
class Running:
    url: str
    server: Server
    thread: threading.Thread

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


@contextmanager
def running(service: ModelService, **kw) -> Iterator[Running]:
    """Serve ``service`` on a thread until the block ends; nothing is left running after it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = server(service, host="127.0.0.1", port=sock.getsockname()[1], log_level="warning", **kw)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="test-server")
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    handle = Running(f"http://127.0.0.1:{sock.getsockname()[1]}", srv, thread)
    try:
        yield handle
    finally:
        if thread.is_alive():
            handle.stop()
        sock.close()
