"""An editing session replayed against this server (without and with its caches) and llama.cpp's llama-server.

    python benchmarks/bench_editor.py                                 # 194M random model, bf16, every mode
    python benchmarks/bench_editor.py --modes base cache --requests 30
    python benchmarks/bench_editor.py --size 7b --quantize int8 --slots 2 --requests 24 --skip-llama-cpp

**The session.** A cursor moves through real source files (by default four of the standard library's; ``--files``
takes others, e.g. this repository's): it jumps into a file, writes code there one keystroke at a time (a line
of the file retyped after its indentation), goes to the end of a line a few lines up or down, starts a new
line, and switches to another file, coming back later near where it was. Everything is drawn from
``random.Random(--seed)``, so every server gets the same requests at the same times.

**The requests** are llama.vim's (``autoload/llama.vim`` of github.com/ggml-org/llama.vim), field for field:
``POST /infill`` with ``input_prefix`` (the 256 lines before the cursor's line), ``prompt`` (the cursor's line up
to the cursor), ``input_suffix`` (the rest of the line and the 64 lines after), ``input_extra`` (the ring of
extra-context chunks: up to 16 chunks of 33 lines, gathered as llama.vim gathers them: around the cursor when a
buffer is entered, left or saved, beyond the window after a jump of more than 32 lines, queued and moved into
the ring once a second while the user is in normal mode, each move sending a ``n_predict: 0`` request that
warms the cache; chunks similar to the text around the cursor leave the ring), ``id_slot: 0``,
``cache_prompt: true``, ``t_max_prompt_ms``, ``t_max_predict_ms``, ``samplers``, ``n_indent``. One FIM request per keystroke and per cursor move in insert mode (llama.vim's
``CursorMovedI``, skipped as llama.vim skips it when more than 8 characters follow the cursor). Changes, the
same for every server: ``temperature: 0`` (so that outputs can be compared), ``stream: true`` (to time the
first token), no ``response_fields`` (to read every count), and each request cut to ``--ctx`` as llama-server
cuts it for ``-c --ctx -b --batch`` (:class:`Fitter`, at whole lines and chunks), so both servers get the
same text (this server refuses a prompt longer than its context).

**The client** sends each request at its time on the session's timer (``--key-ms`` between keystrokes,
``--move-ms`` before a move, ``--pause-ms`` after entering a file). ``--client wait`` (llama.vim: one request in
flight): a request due while the one before it is in flight is sent when that one is answered, so every
server gets the same requests in the same order, and a slow one falls behind the typing instead of piling
up requests (``late``: how long after its keystroke a request was sent, on average). ``--client supersede``
(llama.vscode): every request is sent at its time and the client gives up on the FIM request in flight.
Time to first token is measured from sending the request.

**Figures**, per server: time to first token p50/p95 (ms) over the FIM requests answered, the wall time of
the session, the prompt tokens each FIM request recomputed (the server's own count: ``timings.prompt_n``;
mean per request and share of all prompt tokens), how many requests a newer one superseded, and how many
answers equal the exact baseline's (``base`` for PSM modes, ``spm`` for SPM ones; greedy, so any difference
comes from an approximation or from bf16 rounding). Servers run one at a time as subprocesses with the same
threads. The llama.cpp peer is llama-server from the shared build (``--llama-server``), on the same weights
written as GGUF (``gguf_export.py``), with ``-c`` twice ``--ctx`` and ``-b`` ``--ctx`` so that its own
infill fitting cuts nothing; a missing binary or ``gguf`` package is a one-line skip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import httpx
import torch

from bench_generate import SIZES
from bench_serve import SHARED_TOKENIZER, ServerProcess, percentile
from codellama import ModelArgs, Tokenizer
from codellama.runtime import parse_dtype
from codellama.formats import open_checkpoint
from codellama.testing import write_checkpoint

STDLIB_FILES = ("argparse.py", "dataclasses.py", "subprocess.py", "tarfile.py")
LLAMA_SERVER = "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
# Ours: every mode a set of server flags; "base" is the server without the new caches.
MODES = {
    "base": ["--cache_ram_mb", "0"],
    "cache": [],  # the prompt cache at its default budget
    "shift": ["--cache_reuse", "{reuse}"],
    "spm": ["--spm_infill"],
    "spm+shift": ["--spm_infill", "--cache_reuse", "{reuse}"],
}
PEERS = {"llama-server": [], "llama-server --cache-reuse {reuse}": ["--cache-reuse", "{reuse}"]}
EXTRA_SIZES = {"7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32016, rope_theta=1e6)}


# ----------------------------------------------------------------------------- llama.vim
@dataclass
class Chunk:
    lines: List[str]
    filename: str

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def chunk_sim(c0: List[str], c1: List[str]) -> float:
    """llama.vim's ``s:chunk_sim``: shared words over all words of two chunks."""
    t0, t1 = re.split(r"\W+", "\n".join(c0)), re.split(r"\W+", "\n".join(c1))
    t0, t1 = [t for t in t0 if t], [t for t in t1 if t]
    if not t0 and not t1:
        return 1.0
    words = set(t0)
    return 2.0 * sum(t in words for t in t1) / (len(t0) + len(t1))


class Vim:
    """Just enough of llama.vim: the buffers and cursor, the local context, the ring of extra chunks."""

    N_PREFIX, N_SUFFIX, N_PREDICT = 256, 64, 128
    RING_N_CHUNKS, RING_CHUNK_SIZE, RING_SCOPE, MAX_LINE_SUFFIX = 16, 64, 1024, 8

    def __init__(self, files: Dict[str, List[str]], rng: random.Random, n_predict: int):
        self.buffers = {name: list(lines) for name, lines in files.items()}
        self.rng, self.n_predict = rng, n_predict
        self.name: Optional[str] = None
        self.y, self.x = 1, 0  # 1-based line, 0-based column (as Vim's line('.') and col('.') - 1)
        self.modified: Dict[str, bool] = {name: False for name in files}
        self.ring: List[Chunk] = []
        self.queued: List[Chunk] = []
        self.pos_y_pick = -9999
        self.first = True  # llama.vim's t_max_predict_ms is 250 for a request without a previous completion

    @property
    def lines(self) -> List[str]:
        return self.buffers[self.name]

    def getline(self, a: int, b: int) -> List[str]:
        """Vim's ``getline(a, b)``: lines a … b, 1-based and inclusive."""
        return self.lines[max(a, 1) - 1:max(b, 0)]

    def rand(self, i0: int, i1: int) -> int:
        return self.rng.randint(i0, i1)

    # ------------------------------------------------------------------ the ring (s:pick_chunk, s:ring_update)
    def around_cursor(self) -> List[str]:
        half = self.RING_CHUNK_SIZE // 2
        return self.getline(max(1, self.y - half), min(self.y + half, len(self.lines)))

    def pick_chunk(self, text: List[str], no_mod: bool, do_evict: bool) -> None:
        if (no_mod and self.modified[self.name]) or len(text) < 3:
            return
        if len(text) + 1 < self.RING_CHUNK_SIZE:
            lines = text
        else:
            l0 = self.rand(0, max(0, len(text) - self.RING_CHUNK_SIZE // 2))
            lines = text[l0:min(l0 + self.RING_CHUNK_SIZE // 2, len(text)) + 1]  # Vim's slices include both ends
        if any(c.lines == lines for c in self.ring + self.queued):
            return
        for pool in (self.queued, self.ring):
            for i in range(len(pool) - 1, -1, -1):
                if chunk_sim(pool[i].lines, lines) > 0.9:
                    if not do_evict:
                        return
                    del pool[i]
        if len(self.queued) == 16:
            del self.queued[0]
        self.queued.append(Chunk(lines, self.name))

    def ring_update(self) -> Optional[dict]:
        """Move the oldest queued chunk into the ring; the request that warms the cache with the new ring."""
        if not self.queued:
            return None
        if len(self.ring) == self.RING_N_CHUNKS:
            del self.ring[0]
        self.ring.append(self.queued.pop(0))
        return {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": self.extra(), "prompt": "",
                "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
                "t_max_prompt_ms": 1, "t_max_predict_ms": 1}

    def extra(self, keep: Optional[int] = None) -> List[dict]:
        ring = self.ring if keep is None else self.ring[len(self.ring) - keep:] if keep else []
        return [{"text": c.text, "time": 0, "filename": c.filename} for c in ring]

    # ------------------------------------------------------------------ FIM (s:fim_ctx_local, llama#fim)
    def fim(self) -> Optional[dict]:
        """The request llama.vim sends now, or None where it sends none (too much text right of the cursor)."""
        line = self.lines[self.y - 1]
        cur_prefix, cur_suffix = line[:self.x], line[self.x:]
        if len(cur_suffix) > self.MAX_LINE_SUFFIX:
            return None
        prefix_lines = self.getline(max(1, self.y - self.N_PREFIX), self.y - 1)
        suffix_lines = self.getline(self.y + 1, min(len(self.lines), self.y + self.N_SUFFIX))
        if not line.strip():
            indent, cur_prefix, cur_suffix = 0, "", ""
        else:
            indent = len(line) - len(line.lstrip())
        text = self.getline(max(1, self.y - self.RING_CHUNK_SIZE // 2),
                            min(self.y + self.RING_CHUNK_SIZE // 2, len(self.lines)))
        l0 = self.rand(0, max(0, len(text) - self.RING_CHUNK_SIZE // 2))
        here = text[l0:min(l0 + self.RING_CHUNK_SIZE // 2, len(text)) + 1]
        self.ring = [c for c in self.ring if chunk_sim(c.lines, here) <= 0.5]  # they would make it repeat itself
        body = {"id_slot": 0, "input_prefix": "\n".join(prefix_lines) + "\n",
                "input_suffix": cur_suffix + "\n" + "\n".join(suffix_lines) + "\n", "input_extra": self.extra(),
                "prompt": cur_prefix, "n_predict": self.n_predict, "stop": [], "n_indent": indent, "top_k": 40,
                "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
                "t_max_prompt_ms": 500, "t_max_predict_ms": 250 if self.first else 1000, "temperature": 0.0}
        self.first = False
        if abs(self.y - self.pos_y_pick) > 32:  # gather chunks beyond the window after a jump
            self.pick_chunk(self.getline(max(1, self.y - self.RING_SCOPE), max(1, self.y - self.N_PREFIX)), False, False)
            self.pick_chunk(self.getline(min(len(self.lines), self.y + self.N_SUFFIX),
                                         min(len(self.lines), self.y + self.N_SUFFIX + self.RING_CHUNK_SIZE)), False, False)
            self.pos_y_pick = self.y
        return body

    # ------------------------------------------------------------------ what the user does
    def enter(self, name: str, y: int) -> None:
        """Save and leave the current buffer (BufWritePost, BufLeave), enter ``name`` at line ``y`` (BufEnter)."""
        if self.name is not None:
            if self.modified[self.name]:
                self.modified[self.name] = False
                self.pick_chunk(self.around_cursor(), True, True)
            self.pick_chunk(self.around_cursor(), True, True)
        self.name, self.y = name, y
        self.x = len(self.lines[y - 1])
        self.pick_chunk(self.around_cursor(), True, True)

    def clear_line(self) -> str:
        """Empty the cursor's line after its indentation; returns what was there (to be typed again)."""
        line = self.lines[self.y - 1]
        indent = len(line) - len(line.lstrip())
        self.lines[self.y - 1], self.x = line[:indent], indent
        self.modified[self.name] = True
        return line[indent:]

    def type(self, char: str) -> None:
        line = self.lines[self.y - 1]
        self.lines[self.y - 1] = line[:self.x] + char + line[self.x:]
        self.x += 1
        self.modified[self.name] = True

    def newline(self) -> None:
        """Enter at the cursor, with the indentation of the line (autoindent)."""
        line = self.lines[self.y - 1]
        indent = line[:len(line) - len(line.lstrip())]
        self.lines[self.y - 1:self.y] = [line[:self.x], indent + line[self.x:]]
        self.y, self.x = self.y + 1, len(indent)
        self.modified[self.name] = True

    def move(self, dy: int) -> None:
        """To the end of the line ``dy`` lines away (arrows, then End)."""
        self.y = min(max(1, self.y + dy), len(self.lines))
        self.x = len(self.lines[self.y - 1])


@dataclass
class Event:
    at: float  # seconds from the start of the session
    kind: str  # "fim" or "ring"
    body: dict
    what: str  # "key", "newline", "move", "enter" (the first request after entering a file)


def make_session(files: Dict[str, List[str]], requests: int, seed: int, n_predict: int, key_s: float, move_s: float,
                 pause_s: float, fit: Callable[[dict], dict]) -> List[Event]:
    """``requests`` FIM requests (and the ring's requests between them) of one editing session; ``fit`` cuts a
    request to the context."""
    rng = random.Random(seed)
    vim = Vim(files, rng, n_predict)
    events: List[Event] = []
    t, last_place = 0.0, {}
    names = list(files)

    def send(kind: str, body: Optional[dict], what: str) -> None:
        if body is not None:
            events.append(Event(t, kind, fit(body), what))

    def good_line(lines: List[str], near: Optional[int]) -> int:
        """A line with at least 12 characters of code to retype, near ``near`` when given."""
        for _ in range(1000):
            y = (rng.randint(max(1, near - 20), min(len(lines), near + 20)) if near is not None
                 else rng.randint(1, len(lines)))
            if len(lines[y - 1].strip()) >= 12 and not lines[y - 1].lstrip().startswith("#"):
                return y
        raise ValueError("no line with code to retype")

    while sum(e.kind == "fim" for e in events) < requests:
        name = rng.choice([n for n in names if n != vim.name])
        vim.enter(name, good_line(vim.buffers[name], last_place.get(name)))
        for tick in range(int(pause_s)):  # normal mode for pause_s: the ring moves once a second
            t += 1.0
            send("ring", vim.ring_update(), "ring")
        t += pause_s - int(pause_s)
        what = "enter"
        for line in range(rng.randint(1, 2)):  # a line or two written here
            if line:  # the next one a few lines away (moved to in normal mode: no request)
                vim.y = good_line(vim.lines, vim.y)
            text = vim.clear_line()
            for char in text[:rng.randint(6, 16)]:
                vim.type(char)
                t += key_s
                send("fim", vim.fim(), what)
                what = "key"
            if rng.random() < 0.4:
                vim.newline()
                t += key_s
                send("fim", vim.fim(), "newline")
            for _ in range(rng.randint(0, 2)):
                vim.move(rng.choice([-3, -2, -1, 1, 2, 3]))
                t += move_s
                send("fim", vim.fim(), "move")
        last_place[name] = vim.y
    fims = [e for e in events if e.kind == "fim"]
    cut = fims[requests - 1].at
    return [e for e in events if e.at <= cut and (e.kind != "fim" or e in fims[:requests])]


class Fitter:
    """Cut a request as llama-server's ``/infill`` does for context ``ctx`` and batch ``batch`` (the prefix to its
    last 3/4 batch tokens, the suffix to its first 1/4 batch less the cursor's line, the extra chunks to what is
    left of the context), but at whole lines and whole chunks, so that both servers get the same text."""

    def __init__(self, tokenizer: Tokenizer, ctx: int, batch: int):
        self.tokenizer, self.ctx, self.batch = tokenizer, ctx, batch

    def n(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False, eos=False))

    def keep(self, lines: List[str], budget: int, from_end: bool) -> List[str]:
        """The most lines (the last ones if ``from_end``) whose text fits ``budget`` tokens (binary search)."""
        lo, hi = 0, len(lines)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.n("".join(lines[len(lines) - mid:] if from_end else lines[:mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lines[len(lines) - lo:] if from_end else lines[:lo]

    def __call__(self, body: dict) -> dict:
        prefix = self.keep(body["input_prefix"].splitlines(keepends=True), 3 * self.batch // 4, True)
        middle = self.n(body["prompt"])
        suffix = self.keep(body["input_suffix"].splitlines(keepends=True), self.batch // 4 - 2 - middle, False)
        budget, extra = self.ctx - self.batch - 2 * max(body["n_predict"], 1) - 16, []  # 16: our layout's blank lines
        for chunk in reversed(body["input_extra"]):  # the newest chunks first, as llama.cpp keeps the last tokens
            budget -= self.n(chunk["text"] + "\n\n")
            if budget < 0:
                break
            extra.insert(0, chunk)
        return {**body, "input_prefix": "".join(prefix), "input_suffix": "".join(suffix), "input_extra": extra}


# ----------------------------------------------------------------------------- the client
@dataclass
class Result:
    event: Event
    sent: float = 0.0
    first: Optional[float] = None
    done: Optional[float] = None
    final: dict = field(default_factory=dict)
    superseded: bool = False
    error: Optional[str] = None

    @property
    def latency(self) -> float:
        """Time to first token: from sending the request (see ``late`` for the wait before it was sent)."""
        return self.first - self.sent

    @property
    def late(self) -> float:
        return self.sent - self.event.at


async def post(client: httpx.AsyncClient, url: str, result: Result, start: float) -> None:
    """One streamed request; the time of its first event, and its final object."""
    body = {**result.event.body, "stream": True}
    result.sent = time.perf_counter() - start
    try:
        async with client.stream("POST", url + "/infill", json=body) as r:
            if r.status_code != 200:
                result.error = f"{r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter() - start
                if result.first is None:
                    result.first = now
                result.final, result.done = data, now  # the last event is the final object
    except asyncio.CancelledError:
        result.superseded = True
        raise


async def replay(url: str, events: List[Event], client_mode: str) -> List[Result]:
    """Send the session's requests: ``wait``, each at its time or when the one before it is answered,
    whichever is later; ``supersede``, each at its time, giving up on the FIM request still in flight."""
    results = [Result(e) for e in events]
    start = time.perf_counter()
    # A connection per request, as llama.vim's curl makes: no race with a server closing an idle keep-alive one.
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        if client_mode == "wait":
            for result in results:
                await asyncio.sleep(max(0.0, result.event.at - (time.perf_counter() - start)))
                await post(client, url, result, start)
            return results
        tasks, in_flight = [], None
        for result in results:
            await asyncio.sleep(max(0.0, result.event.at - (time.perf_counter() - start)))
            if result.event.kind == "fim" and in_flight is not None and not in_flight.done():
                in_flight.cancel()
            task = asyncio.create_task(post(client, url, result, start))
            tasks.append(task)
            if result.event.kind == "fim":
                in_flight = task
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(results: List[Result], reference: Optional[List[Result]]) -> dict:
    fims = [r for r in results if r.event.kind == "fim"]
    answered = [r for r in fims if r.first is not None and r.done is not None and r.error is None]
    latencies = [r.latency * 1000 for r in answered]
    prompt = [r.final.get("tokens_evaluated", 0) for r in answered]
    recomputed = [r.final.get("timings", {}).get("prompt_n", 0) for r in answered]
    same = None
    if reference is not None:
        pairs = [(a, b) for a, b in zip(fims, [r for r in reference if r.event.kind == "fim"])
                 if a in answered and b.done is not None]
        same = (sum(a.final.get("content") == b.final.get("content") for a, b in pairs), len(pairs))
    errors = [r.error for r in results if r.error]
    by_kind = {k: statistics.median(r.latency * 1000 for r in answered if r.event.what == k)
               for k in ("enter", "key", "newline", "move") if any(r.event.what == k for r in answered)}
    return {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "late": statistics.mean(r.late for r in fims) * 1000 if fims else float("nan"),
            "mean": statistics.mean(latencies) if latencies else float("nan"),
            "wall": max((r.done or r.sent) for r in results), "answered": len(answered), "fims": len(fims),
            "superseded": sum(r.superseded for r in fims), "recomputed": statistics.mean(recomputed) if recomputed else 0,
            "share": sum(recomputed) / max(sum(prompt), 1), "prompt": (min(prompt, default=0), max(prompt, default=0)),
            "same": same, "errors": errors, "by_kind": by_kind}


def row(name: str, s: dict) -> str:
    same = f"{s['same'][0]}/{s['same'][1]}" if s["same"] else "—"
    return (f"| {name} | {s['p50']:.0f} | {s['p95']:.0f} | {s['mean']:.0f} | {s['late']:.0f} | {s['wall']:.1f} | "
            f"{s['recomputed']:.0f} | {100 * s['share']:.0f}% | {s['answered']}/{s['fims']} | {s['superseded']} | {same} |")


def report(line: str, s: dict) -> None:
    kinds = ", ".join(f"{k} {v:.0f}" for k, v in s["by_kind"].items())
    print(line, f"prompts {s['prompt'][0]}–{s['prompt'][1]} tokens; median ms by request: {kinds}",
          f"errors: {s['errors'][:2]}" if s["errors"] else "", flush=True)


def run_server(name: str, command: List[str], ready: str, events: List[Event], client: str) -> List[Result]:
    server = ServerProcess(command, ready=ready, timeout=1800)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # llama-server says it listens before its model is loaded
            try:
                if httpx.get(server.url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        warm = Event(0.0, "fim", {**events[0].body, "input_prefix": "x = 1\n", "input_suffix": "\n",
                                  "input_extra": [], "prompt": ""}, "warm-up")
        asyncio.run(replay(server.url, [warm], client))  # the first request pays for lazy set-up: not the session's
        return asyncio.run(replay(server.url, events, client))
    finally:
        server.stop()
        if server.proc.returncode not in (0, -15, None):
            print(f"{name} exited with {server.proc.returncode}:\n{server.log[-2000:]}", file=sys.stderr)


def llama_server_missing(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return f"{path} is not built"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed (pip install gguf)"
    return None


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=sorted({**SIZES, **EXTRA_SIZES}))
    p.add_argument("--ckpt_dir", default=None, help="a real checkpoint (Meta or HF layout, with its tokenizer) "
                   "instead of a random model, e.g. codellama/assets/tiny with --ctx 512 --batch 256 to measure "
                   "chunk reuse's agreement on a trained model")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="our server's --quantize (int8: "
                   "llama-server gets the GGUF quantized to Q8_0)")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES), help="our server's modes (none: "
                   "only llama-server)")
    p.add_argument("--files", nargs="+", default=None, help="source files (default: four of the standard library's)")
    p.add_argument("--requests", type=int, default=60, help="FIM requests in the session")
    p.add_argument("--n-predict", type=int, default=1)
    p.add_argument("--reuse", type=int, default=256, help="--cache_reuse of the shift modes (and llama-server's)")
    p.add_argument("--ctx", type=int, default=4096, help="our --max_seq_len; prompts are kept within it")
    p.add_argument("--batch", type=int, default=2048, help="llama-server's -b (its infill fitting's budgets)")
    p.add_argument("--slots", type=int, default=4, help="our --max_batch_size and llama-server's -np")
    p.add_argument("--client", default="wait", choices=["wait", "supersede"])
    p.add_argument("--key-ms", type=float, default=250)
    p.add_argument("--move-ms", type=float, default=600)
    p.add_argument("--pause-ms", type=float, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--llama-server", default=LLAMA_SERVER)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--model-dir", default=None, help="keep the random checkpoint and its GGUF here between runs "
                   "(default: a temporary directory)")
    p.add_argument("--server-ckpt", default=None, help="our server's checkpoint instead of the random one: the "
                   "same model written quantized by `python -m codellama.quantize` (a 7B model quantizes in less "
                   "memory so than as it loads)")
    p.add_argument("--json", default=None, help="also write every request's figures here")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more flags for our server")
    a = p.parse_args()

    tokenizer_path = os.path.join(a.ckpt_dir, "tokenizer.model") if a.ckpt_dir else SHARED_TOKENIZER
    if not os.path.isfile(tokenizer_path):
        sys.exit(f"needs a Code Llama tokenizer with the FIM pieces: {tokenizer_path}")
    tokenizer = Tokenizer(tokenizer_path)
    paths = a.files or [os.path.join(sysconfig.get_paths()["stdlib"], f) for f in STDLIB_FILES]
    files = {os.path.basename(f): open(f, encoding="utf-8").read().splitlines() for f in paths}

    events = make_session(files, a.requests, a.seed, a.n_predict, a.key_ms / 1000, a.move_ms / 1000,
                          a.pause_ms / 1000, Fitter(tokenizer, a.ctx, a.batch))
    fims = [e for e in events if e.kind == "fim"]
    kinds = {k: sum(e.what == k for e in fims) for k in ("enter", "key", "newline", "move")}
    if a.ckpt_dir:
        args = open_checkpoint(a.ckpt_dir).args
    else:
        args = ModelArgs(**{**{**SIZES, **EXTRA_SIZES}[a.size], "vocab_size": tokenizer.n_words})
    print(f"torch {torch.__version__}, {a.threads} threads, load average {os.getloadavg()[0]:.2f}; model "
          f"{args.num_params() / 1e6:.0f}M parameters ({a.size}), {a.dtype}{' ' + a.quantize if a.quantize else ''}; "
          f"{len(fims)} FIM requests ({', '.join(f'{v} {k}' for k, v in kinds.items())}) and "
          f"{len(events) - len(fims)} ring updates over {events[-1].at:.1f} s; n_predict {a.n_predict}; "
          f"files {', '.join(files)}; client {a.client}; {a.slots} slots, context {a.ctx}")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    table = ["| server | TTFT p50 (ms) | TTFT p95 (ms) | mean (ms) | late (ms) | wall (s) | recomputed / request "
             "| recomputed share | answered | superseded | same as exact |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    results: Dict[str, List[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.model_dir:
            tmp = os.path.join(a.model_dir, f"{a.size}-{a.dtype}")
            os.makedirs(tmp, exist_ok=True)  # (with --ckpt_dir nothing else makes it before the GGUF is written)
        ckpt = a.ckpt_dir or os.path.join(tmp, "ckpt-hf")
        if not a.ckpt_dir and not os.path.isfile(os.path.join(ckpt, "tokenizer.model")):
            # the random model in the HF layout, a tensor at a time (a 7B one needs no 7B of memory); the
            # tokenizer is copied last, so a write cut short is written again
            write_checkpoint(ckpt, args, "hf", dtype=parse_dtype(a.dtype), tokenizer=tokenizer_path)
        makers = {k: v.load for k, v in open_checkpoint(ckpt).tensors.items()}  # (the GGUF, a tensor at a time)
        for mode in a.modes:
            command = [sys.executable, "-m", "codellama.serve", "--ckpt_dir", a.server_ckpt or ckpt, "--port", "0",
                       "--dtype", a.dtype,
                       "--max_batch_size", str(a.slots), "--max_seq_len", str(a.ctx),
                       *(f.format(reuse=a.reuse) for f in MODES[mode]), *a.server_args]
            if a.quantize and not a.server_ckpt:
                command += ["--quantize", a.quantize]
            results[mode] = run_server(mode, command, r"Uvicorn running on (http://\S+)", events, a.client)
            reference = results.get("spm" if mode.startswith("spm") else "base")
            s = summarize(results[mode], reference if reference is not results[mode] else None)
            table.append(row(mode, s))
            report(table[-1], s)
        why_not = "--skip-llama-cpp" if a.skip_llama_cpp else llama_server_missing(a.llama_server)
        if why_not:
            print(f"llama-server skipped: {why_not}")
        else:
            from gguf_export import write_gguf
            gguf_path = os.path.join(tmp, "model.gguf")
            if not os.path.isfile(gguf_path) or os.path.getmtime(gguf_path) < os.path.getmtime(ckpt):
                bf16 = a.dtype == "bf16" and not a.ckpt_dir
                write_gguf(gguf_path, makers, args, tokenizer_path, a.ctx, bf16=bf16)
            if a.quantize == "int8":  # llama.cpp's 8-bit scheme for our int8
                q8 = os.path.join(tmp, "model-q8_0.gguf")
                if not os.path.isfile(q8):
                    quantizer = os.path.join(os.path.dirname(a.llama_server), "llama-quantize")
                    subprocess.run([quantizer, gguf_path, q8, "Q8_0", str(a.threads)], check=True,
                                   stdout=subprocess.DEVNULL)
                gguf_path = q8
            for name, flags in PEERS.items():
                name, flags = name.format(reuse=a.reuse), [f.format(reuse=a.reuse) for f in flags]
                port = free_port()
                command = [a.llama_server, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port),
                           "-c", str(a.ctx * a.slots), "-b", str(a.batch), "-ub", "512", "-np", str(a.slots),
                           "-t", str(a.threads), "-tb", str(a.threads), *flags]
                results[name] = run_server(name, command, r"listening on (http://[0-9.:]+)", events, a.client)
                s = summarize(results[name], None)
                table.append(row(name, s))
                report(table[-1], s)
    print("\n" + "\n".join(table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({name: [{"at": r.event.at, "kind": r.event.kind, "what": r.event.what, "sent": r.sent,
                               "first": r.first, "done": r.done, "superseded": r.superseded, "error": r.error,
                               "prompt": r.final.get("tokens_evaluated"), "cached": r.final.get("tokens_cached"),
                               "computed": r.final.get("timings", {}).get("prompt_n"),
                               "content": r.final.get("content")} for r in rs]
                       for name, rs in results.items()}, f, indent=1)
    if "base" in results:
        base = summarize(results["base"], None)
        for name in results:
            if name != "base":
                s = summarize(results[name], None)
                print(f"{name}: p50 {base['p50'] / s['p50']:.2f}× lower than base, p95 {base['p95'] / s['p95']:.2f}×")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
