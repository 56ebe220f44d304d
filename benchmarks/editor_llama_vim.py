"""llama.vim, unchanged, in a real Vim or Neovim (on a pseudo-terminal) against ``python -m codellama.serve``.

    python benchmarks/editor_llama_vim.py --llama-vim DIR          # DIR: a checkout of ggml-org/llama.vim
    python benchmarks/editor_llama_vim.py --llama-vim DIR --editor nvim

Vim opens 18 other standard-library files (llama.vim gathers chunks of each as extra context, and sends each
to the server's cache as it enters its ring of 16), then a ~1,000-line file (``functools.py``), goes to line
500 and enters insert mode at its end: llama.vim sends its ``/infill`` request and, when the answer comes,
draws the suggestion as virtual text with its info line. A recording proxy between Vim and the server keeps
every request body and answer. The script prints what llama.vim sent (the fields, the number of extra chunks)
and how the suggestion arrived: the time from entering insert mode to the drawn suggestion, and the server's
``predicted_ms`` against the request's ``t_max_predict_ms``. Exit status 1 when no suggestion was drawn.
Needs vim (with +job, +timers, +textprop) or nvim, and curl, which llama.vim calls.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.dirname(os.__file__)
TARGET = os.path.join(STDLIB, "functools.py")
OTHERS = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "heapq.py", "bisect.py", "shlex.py",
          "fnmatch.py", "glob.py", "copy.py", "csv.py", "difflib.py", "gettext.py", "ipaddress.py", "locale.py",
          "operator.py", "pprint.py", "queue.py"]

VIMSCRIPT = r"""
set nocompatible nomore noswapfile hidden shortmess+=AIF
let &runtimepath = '{llama_vim},' . &runtimepath
let g:llama_config = {{'endpoint_fim': '{endpoint}', 'ring_update_ms': 200, 'show_info': 2, 'ring_n_chunks': 16}}
runtime plugin/llama.vim
let s:files = {files}
function! s:next(timer) abort
  if empty(s:files)
    " a scratch buffer: leaving it picks nothing, so the ring stays as it settles now (16 chunks, one per file)
    enew
    call timer_start(8000, function('s:fim'))
    return
  endif
  execute 'edit ' . fnameescape(remove(s:files, 0))
  call cursor(line('$') / 2, 1)
  call timer_start(300, function('s:next'))
endfunction
function! s:fim(timer) abort
  let s:ring_before = s:vars()
  execute 'edit ' . fnameescape('{target}')
  call cursor({line}, 1)
  let s:t0 = reltime()
  call feedkeys("A", 'nt')
  call timer_start(20, function('s:poll'))
endfunction
function! s:vars() abort
  " llama.vim's own state (this Vim's prop_list() does not give virtual text back)
  let l:sid = get(get(getscriptinfo({{'name': 'autoload/llama.vim'}}), 0, {{}}), 'sid', 0)
  return l:sid ? get(getscriptinfo({{'sid': l:sid}})[0], 'variables', {{}}) : {{}}
endfunction
function! s:drawn() abort
  " [ghost-text pieces, the info line's text] as llama.vim drew them: text properties in Vim, extmarks in Neovim
  if has('nvim')
    let l:marks = nvim_buf_get_extmarks(0, nvim_create_namespace('vt_fim'), 0, -1, {{'details': v:true}})
    let l:pieces = []
    let l:info = ''
    for l:mark in l:marks
      for [l:text, l:hl] in get(l:mark[3], 'virt_text', [])
        if l:hl ==# 'llama_hl_fim_info' | let l:info = l:text | else | call add(l:pieces, l:text) | endif
      endfor
      for l:line in get(l:mark[3], 'virt_lines', [])
        call add(l:pieces, join(map(copy(l:line), 'v:val[0]'), ''))
      endfor
    endfor
    return [l:pieces, l:info]
  endif
  let l:props = prop_list({line})
  let l:hint = filter(copy(l:props), 'v:val.type ==# "llama_hl_fim_hint"')
  let l:info = filter(copy(l:props), 'v:val.type ==# "llama_hl_fim_info"')
  return [map(l:hint, 'get(v:val, "text", "")'), empty(l:info) ? '' : get(l:info[0], 'text', 'shown')]
endfunction
function! s:poll(timer) abort
  let [l:pieces, l:info] = s:drawn()
  if !empty(l:info) || reltimefloat(reltime(s:t0)) > {timeout}
    let l:vars = s:vars()
    let l:result = {{'shown': !empty(l:info), 'ms': 1000 * reltimefloat(reltime(s:t0)), 'mode': mode(),
          \ 'hint_props': len(l:pieces), 'info': l:info,
          \ 'content': get(get(l:vars, 'fim_data', {{}}), 'content', l:pieces),
          \ 'ring': len(get(s:ring_before, 'ring_chunks', [])), 'queued': len(get(s:ring_before, 'ring_queued', []))}}
    call writefile([json_encode(l:result)], '{out}')
    qall!
  endif
  call timer_start(20, function('s:poll'))
endfunction
call timer_start(500, function('s:next'))
"""


class Recorder(BaseHTTPRequestHandler):
    """A proxy that forwards each request to the server and records its body, answer and time."""

    upstream: str = ""
    records: List[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        host, port = self.upstream.split("//")[1].split(":")
        began = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request("POST", self.path, body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
        self.records.append({"path": self.path, "request": json.loads(body or b"{}"), "status": answer.status,
                             "ms": 1000 * (time.perf_counter() - began), "answer": data.decode()})
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # llama.vim stopped this curl for a newer request
            pass

    def log_message(self, *args) -> None:
        pass


def start_server(max_seq_len: int) -> tuple:
    proc = subprocess.Popen([sys.executable, "-m", "codellama.serve", "--port", "0", "--max_seq_len", str(max_seq_len),
                             "--max_batch_size", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline, log = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        log += line
        found = re.search(r"Uvicorn running on (http://\S+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, found.group(1)
        if not line:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{log}")


def run_vim(editor: str, script: str, timeout: float) -> None:
    """Vim (or Neovim) on a pseudo-terminal (it draws to it; nobody looks), until it quits or ``timeout`` passes."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm"
        os.execvp(editor, [editor, "-N", "-u", script, "-i", "NONE", "-n"])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    os.read(fd, 65536)
                except OSError:  # vim has exited
                    break
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def run(llama_vim: str, line: int = 500, max_seq_len: int = 512, timeout: float = 120.0, editor: str = "vim") -> dict:
    """The whole scenario in ``editor`` (vim or nvim); returns what it drew and what went over the wire."""
    if not shutil.which(editor) or not shutil.which("curl"):
        raise RuntimeError(f"needs {editor} and curl")
    proc, url = start_server(max_seq_len)
    Recorder.upstream, Recorder.records = url, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="llama-vim-")
    try:
        out = os.path.join(tmp, "result.json")
        files = [os.path.join(STDLIB, f) for f in OTHERS]
        script = os.path.join(tmp, "test.vim")
        with open(script, "w") as f:
            f.write(VIMSCRIPT.format(llama_vim=llama_vim, endpoint=f"http://127.0.0.1:{proxy.server_port}/infill",
                                     files=json.dumps(files), target=TARGET, line=line, timeout=timeout / 2,
                                     out=out))
        run_vim(editor, script, timeout)
        drawn = json.load(open(out)) if os.path.exists(out) else {"shown": False}
    finally:
        proxy.shutdown()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"vim": drawn, "requests": Recorder.records}


def report(result: dict) -> bool:
    vim, records = result["vim"], result["requests"]
    warm = [r for r in records if r["request"].get("n_predict") == 0]
    fims = [r for r in records if r["request"].get("n_predict", 0) > 0]
    print(f"requests: {len(records)} ({len(warm)} cache warm-ups with n_predict 0, {len(fims)} suggestions); "
          f"statuses {sorted({r['status'] for r in records})}")
    for r in fims:
        sent, answer = r["request"], json.loads(r["answer"])
        print(f"suggestion request: {len(sent['input_prefix'].splitlines())} prefix lines, "
              f"{len(sent['input_suffix'].splitlines())} suffix lines, {len(sent['input_extra'])} extra chunks, "
              f"n_indent {sent['n_indent']}, t_max_predict_ms {sent['t_max_predict_ms']}; round trip {r['ms']:.0f} "
              f"ms, prompt {answer.get('timings/prompt_n')} tokens in {answer.get('timings/prompt_ms', 0):.0f} ms "
              f"(cached {answer.get('tokens_cached')}), {answer.get('timings/predicted_n')} tokens in "
              f"{answer.get('timings/predicted_ms', 0):.0f} ms, truncated {answer.get('truncated')}: "
              f"{answer.get('content')!r}")
    if fims:
        print(f"fields llama.vim sent: {sorted(fims[-1]['request'])}")
    print(f"editor: suggestion drawn {vim['shown']} {vim.get('ms', 0):.0f} ms after entering insert mode (mode "
          f"{vim.get('mode')!r}), {vim.get('hint_props', 0)} ghost-text pieces: {vim.get('content')}; info line "
          f"{vim.get('info')!r}; its ring held {vim.get('ring')} chunks ({vim.get('queued')} queued) when the file "
          f"was opened")
    return bool(vim["shown"])


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-vim", default=os.environ.get("LLAMA_VIM_DIR"), help="llama.vim checkout ($LLAMA_VIM_DIR)")
    p.add_argument("--editor", choices=("vim", "nvim"), default="vim")
    p.add_argument("--line", type=int, default=500)
    p.add_argument("--max_seq_len", type=int, default=512, help="the server's context (the bundled model's: 512)")
    a = p.parse_args(argv)
    if not a.llama_vim or not os.path.isfile(os.path.join(a.llama_vim, "autoload", "llama.vim")):
        sys.exit("give --llama-vim DIR, a checkout of https://github.com/ggml-org/llama.vim")
    sys.exit(0 if report(run(os.path.abspath(a.llama_vim), a.line, a.max_seq_len, editor=a.editor)) else 1)


if __name__ == "__main__":
    main()
