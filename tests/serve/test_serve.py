"""The HTTP server with real clients over real sockets: the ``openai`` package and ``httpx`` against the OpenAI,
Ollama and llama.cpp endpoints, on the bundled tiny model, each answer checked against ``Llama``'s own methods.
"""

import asyncio
import copy
import json
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import httpx
import openai
import pytest

from codellama import Llama
from codellama.engine import Engine
from codellama.serve.app import Server, server
from codellama.serve.service import ModelService, split_fim_text

PREFIX, SUFFIX = "def total(xs):\n    result = 0\n    for x in xs:\n", "\n    return result\n"
PROMPTS = ["import os\nimport sys\n", "def fibonacci(n):\n    if n < 2:\n", "class Stack:\n", "    for line in f:\n",
           "x = [i * i for i in range(10)]\n", "try:\n    import json\n", "@dataclass\nclass Point:\n", "# utils\n"]
DIALOG = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Reverse a string."}]
N = 24  # new tokens per request: enough to show the texts agree, small enough to stay fast
MAX_SEQ_LEN = 256
NAME = "codellama-tiny"


# ----------------------------------------------------------------------------- servers (in-process, ephemeral ports)
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


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=MAX_SEQ_LEN, max_batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def srv(tiny):
    with running(make_service(tiny)) as handle:
        yield handle


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


@pytest.fixture
def oai(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def infilled(tiny, prefix=PREFIX, suffix=SUFFIX, **kw):
    return tiny.text_infilling([prefix], [suffix], temperature=0, max_gen_len=N, **kw)[0]["generation"]


def completed(tiny, prompt, n=N):
    """The server's completion of ``prompt``: ``text_completion``'s tokens, read as a continuation (keeping the
    first token's leading space, which ``text_completion`` drops as Meta's reference does)."""
    [tokens], _ = tiny.generate([tiny.tokenizer.encode(prompt, bos=True, eos=False)], n, temperature=0)
    return tiny.tokenizer.decode_infilling(tokens)


def ndjson_lines(response):
    return [json.loads(line) for line in response.iter_lines() if line]


def sse_data(response):
    return [json.loads(line[len("data: "):]) for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# ----------------------------------------------------------------------------- OpenAI
@pytest.mark.parametrize("stream", [False, True])
def test_openai_completion_with_suffix_is_text_infilling(tiny, oai, stream):
    out = oai.completions.create(model=NAME, prompt=PREFIX, suffix=SUFFIX, max_tokens=N, temperature=0, stream=stream)
    if stream:
        chunks = list(out)
        text = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    else:
        text = out.choices[0].text
        usage = out.usage
        assert usage.completion_tokens <= N and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert text == infilled(tiny)


@pytest.mark.parametrize("suffix_first", [False, True])
def test_fim_spelled_as_text_is_text_infilling(tiny, oai, suffix_first):
    """Continue's OpenAI provider and Tabby send ``<PRE> {prefix} <SUF>{suffix} <MID>`` as the prompt."""
    text = f"<PRE> <SUF>{SUFFIX} <MID> {PREFIX}" if suffix_first else f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>"
    assert split_fim_text(text) == (PREFIX, SUFFIX, suffix_first)
    out = oai.completions.create(model=NAME, prompt=text, max_tokens=N, temperature=0, stop=["<EOT>"])
    assert out.choices[0].text == infilled(tiny, suffix_first=suffix_first)


def test_fim_text_split():
    assert split_fim_text("def f(): <SUF> <MID>") is None
    assert split_fim_text("<PRE> a <SUF>b") is None
    assert split_fim_text("<PRE>  <SUF>x <MID>") == ("", "x", False)


def test_openai_chat_stream_joins_to_chat_completion(tiny, oai):
    expected = tiny.chat_completion([DIALOG], temperature=0, max_gen_len=N)[0]["generation"]["content"]
    chunks = list(oai.chat.completions.create(model=NAME, messages=DIALOG, max_tokens=N, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert 0 < chunks[-1].usage.completion_tokens <= N and not chunks[-1].choices
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished in (["stop"], ["length"])
    whole = oai.chat.completions.create(model=NAME, messages=DIALOG, max_completion_tokens=N, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"


def test_openai_models_give_the_context_length(oai):
    [card] = oai.models.list().data
    assert card.id == NAME and card.context_length == MAX_SEQ_LEN
    assert oai.models.retrieve(NAME).id == NAME


def test_openai_prompts_choices_echo_and_logprobs(tiny, oai):
    out = oai.completions.create(model=NAME, prompt=PROMPTS[:2], n=2, echo=True, logprobs=1, max_tokens=8,
                                 temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        prompt = PROMPTS[c.index // 2]
        assert c.text.startswith(prompt)
        assert "".join(c.logprobs.tokens).endswith(c.text[len(prompt):])
        assert c.logprobs.token_logprobs[0] is None and all(v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert out.choices[0].text == PROMPTS[0] + completed(tiny, PROMPTS[0], 8) == out.choices[1].text


def test_openai_top_logprobs_name_the_likeliest_tokens(tiny, oai):
    """Completions' ``logprobs: N`` and chat's ``top_logprobs``: the N likeliest tokens at each position, greedy's
    choice among them with the largest value; streamed the same as whole."""
    out = oai.completions.create(model=NAME, prompt=PROMPTS[1], logprobs=3, max_tokens=8, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == 8
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and all(v <= 0 for v in top.values())
        assert max(top.values()) == pytest.approx(value)  # greedy chose the likeliest
    streamed = [c.choices[0].logprobs for c in oai.completions.create(
        model=NAME, prompt=PROMPTS[1], logprobs=3, max_tokens=8, temperature=0, stream=True) if c.choices[0].logprobs]
    streamed_tops = [t for c in streamed for t in c.top_logprobs]  # the same up to float rounding (a reused prefix)
    assert [sorted(t) for t in streamed_tops] == [sorted(t) for t in lp.top_logprobs]
    assert [t[k] for t in streamed_tops for k in sorted(t)] == pytest.approx(
        [t[k] for t in lp.top_logprobs for k in sorted(t)], abs=1e-5)
    echoed = oai.completions.create(model=NAME, prompt=PROMPTS[1], logprobs=2, echo=True, max_tokens=4, temperature=0)
    tops = echoed.choices[0].logprobs.top_logprobs
    assert tops[0] is None and all(2 <= len(t) <= 3 for t in tops[1:])
    assert len(tops) == len(tiny.tokenizer.encode(PROMPTS[1], bos=True, eos=False)) + 4

    chat = oai.chat.completions.create(model=NAME, messages=DIALOG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        values = [alt.logprob for alt in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(entry.logprob)
        assert all(alt.bytes == list(alt.token.encode()) for alt in entry.top_logprobs)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        oai.chat.completions.create(model=NAME, messages=DIALOG, max_tokens=2, top_logprobs=3)


def test_ollama_logprobs_whole_and_streamed(http):
    body = {"model": NAME, "prompt": PROMPTS[1], "stream": False, "logprobs": True, "top_logprobs": 2,
            "options": {"temperature": 0, "num_predict": 8}}
    whole = http.post("/api/generate", json=body).json()
    entries = whole["logprobs"]
    assert len(entries) == whole["eval_count"] == 8 and "".join(e["token"] for e in entries) == whole["response"]
    for e in entries:
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert e["bytes"] == list(e["token"].encode())
    with http.stream("POST", "/api/generate", json={**body, "stream": True}) as r:
        streamed = [e for line in ndjson_lines(r) for e in line.get("logprobs", [])]
    assert [(e["token"], sorted(a["token"] for a in e["top_logprobs"])) for e in streamed] == \
        [(e["token"], sorted(a["token"] for a in e["top_logprobs"])) for e in entries]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
    chat = http.post("/api/chat", json={"model": NAME, "messages": DIALOG, "stream": False, "logprobs": True,
                                        "options": {"temperature": 0, "num_predict": 4}}).json()
    assert len(chat["logprobs"]) == 4 and all(e["top_logprobs"] == [] for e in chat["logprobs"])
    assert "logprobs" not in http.post("/api/generate", json={**body, "logprobs": False, "top_logprobs": 0}).json()
    bad = http.post("/api/generate", json={**body, "logprobs": False})
    assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.json()["error"]


def test_alternative_token_texts(tiny):
    service = make_service(tiny, max_batch_size=1)
    sp = tiny.tokenizer.sp_model
    assert service.piece_text(sp.piece_to_id("<0x0A>")) == "\n"
    assert service.piece_text(sp.piece_to_id("<0xE2>")) == "bytes:\\xe2"
    word = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 2)
    assert service.piece_text(word) == " " + sp.id_to_piece(word)[1:]


def test_openai_token_prompt_and_sampled_choices(tiny, oai):
    ids = tiny.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    out = oai.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == completed(tiny, PROMPTS[1], 8)
    for prompt in ("x =", "print(a,", "import"):  # the new text continues the prompt, leading space and all
        [tokens], _ = tiny.generate([tiny.tokenizer.encode(prompt, bos=True, eos=False)], 4, temperature=0)
        text = oai.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
        assert prompt + text == tiny.tokenizer.decode(tiny.tokenizer.encode(prompt, bos=False, eos=False) + tokens)
    seeded = [oai.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=1, seed=3, n=2)
              for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]  # a seed reproduces


# ----------------------------------------------------------------------------- Ollama
def test_ollama_generate_streams_ndjson_infilling(tiny, http):
    body = {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX, "options": {"temperature": 0, "num_predict": N}}
    with http.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson_lines(r)
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    assert lines[-1]["done_reason"] in ("stop", "length") and lines[-1]["eval_count"] <= N
    assert "".join(line["response"] for line in lines) == infilled(tiny)
    whole = http.post("/api/generate", json={**body, "model": NAME + ":latest", "stream": False}).json()
    assert whole["response"] == infilled(tiny) and whole["done"] and whole["prompt_eval_count"] > 0
    raw = http.post("/api/generate", json={"model": NAME, "raw": True, "stream": False, "prompt":
                                           f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>", "options": body["options"]}).json()
    assert raw["response"] == infilled(tiny)


def test_ollama_chat_streams(tiny, http):
    expected = tiny.chat_completion([DIALOG], temperature=0, max_gen_len=N)[0]["generation"]["content"]
    body = {"model": NAME, "messages": DIALOG, "options": {"temperature": 0, "num_predict": N}}
    with http.stream("POST", "/api/chat", json=body) as r:
        lines = ndjson_lines(r)
    assert "".join(line["message"]["content"] for line in lines) == expected and lines[-1]["done"]
    assert all(line["message"]["role"] == "assistant" for line in lines)


def test_ollama_tags_and_show_tell_continue_it_can_infill(http):
    [model] = http.get("/api/tags").json()["models"]
    assert model["name"] == NAME + ":latest"
    shown = http.post("/api/show", json={"name": NAME}).json()  # Continue sends "name"
    assert ".Suffix" in shown["template"] and "insert" in shown["capabilities"]
    for line in shown["parameters"].split("\n"):  # Continue parses each line with this pattern
        assert re.match(r'^(\S+)\s+((?:".*")|\S+)$', line), line
    assert f"num_ctx {MAX_SEQ_LEN}" in shown["parameters"]
    assert shown["model_info"]["llama.context_length"] == MAX_SEQ_LEN
    r = http.post("/api/show", json={"model": "llama3"})  # one model served, whatever the name (unless strict)
    assert r.status_code == 200 and r.json()["model_info"]["llama.context_length"] == MAX_SEQ_LEN


# ----------------------------------------------------------------------------- llama.cpp
def test_llamacpp_infill_and_completion(tiny, http):
    extra = [{"filename": "util.py", "text": "def helper():\n    pass"}]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra, "n_predict": N, "temperature": 0}
    expected = infilled(tiny, prefix="def helper():\n    pass\n\n" + PREFIX)
    out = http.post("/infill", json=body).json()
    assert out["content"] == expected and out["stop"] and out["stop_type"] in ("eos", "limit")
    with http.stream("POST", "/infill", json={**body, "stream": True}) as r:
        events = sse_data(r)
    assert "".join(e["content"] for e in events) == expected
    assert events[-1]["stop"] and not any(e["stop"] for e in events[:-1]) and events[-1]["tokens_predicted"] <= N
    completion = http.post("/completion", json={"prompt": PROMPTS[2], "n_predict": 8, "temperature": 0}).json()
    assert completion["content"] == completed(tiny, PROMPTS[2], 8)
    assert http.get("/health").json() == {"status": "ok"}


# ----------------------------------------------------------------------------- many clients
def test_concurrent_streaming_clients_each_get_their_solo_output(tiny, srv):
    solo = [completed(tiny, p) for p in PROMPTS]

    async def one(client, prompt):
        body = {"model": NAME, "prompt": prompt, "max_tokens": N, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            return "".join([e["choices"][0]["text"] async for e in _sse(r)])

    async def all_at_once():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    assert asyncio.run(all_at_once()) == solo


async def _sse(response):
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def captured_requests(service, monkeypatch):
    """The engine requests the server submits, as they are submitted."""
    seen, submit = [], service.engine.submit

    def spy(*args, **kw):
        seen.append(submit(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(service.engine, "submit", spy)
    return seen


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_disconnects_frees_its_slot(srv, http, monkeypatch):
    seen = captured_requests(srv.server.config.app.state.service, monkeypatch)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": MAX_SEQ_LEN, "temperature": 0}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())
    wait_until(lambda: seen[-1].done)
    assert seen[-1].finish_reason == "cancelled" and len(seen[-1].tokens) < MAX_SEQ_LEN - 10
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        http.post("/api/generate", json={"model": NAME, "prompt": PROMPTS[1], "stream": False,
                                         "options": {"num_predict": MAX_SEQ_LEN}}, timeout=0.05)
    wait_until(lambda: len(seen) == 2 and seen[-1].done)
    assert seen[-1].finish_reason == "cancelled"


# ----------------------------------------------------------------------------- refusals
def test_a_full_queue_is_503_with_retry_after(tiny):
    with running(make_service(tiny, max_batch_size=1, max_waiting=1)) as busy, \
            httpx.Client(base_url=busy.url, timeout=30) as http:
        long = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": MAX_SEQ_LEN, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # decoding: it holds the only slot
            with http.stream("POST", "/v1/completions", json=long) as second:  # waits for the slot
                assert second.status_code == 200
                for path, body, error in [("/v1/completions", long, lambda j: j["error"]["message"]),
                                          ("/api/generate", {"model": NAME, "prompt": "x"}, lambda j: j["error"]),
                                          ("/completion", {"prompt": "x"}, lambda j: j["error"]["message"])]:
                    r = http.post(path, json=body)
                    assert r.status_code == 503 and r.headers["retry-after"] == "1"
                    assert "busy" in error(r.json())


def test_a_prompt_longer_than_the_context_is_400(http):
    long = "word " * (2 * MAX_SEQ_LEN)
    for path, body, error in [("/v1/completions", {"prompt": long}, lambda j: j["error"]["message"]),
                              ("/api/generate", {"model": NAME, "prompt": long, "stream": False}, lambda j: j["error"]),
                              ("/completion", {"prompt": long}, lambda j: j["error"]["message"])]:
        r = http.post(path, json=body)
        assert r.status_code == 400 and f"context size ({MAX_SEQ_LEN} tokens)" in error(r.json()), r.text
    error = http.post("/completion", json={"prompt": long}).json()["error"]  # llama.cpp's type and counts
    assert error["type"] == "exceed_context_size_error" and error["n_ctx"] == MAX_SEQ_LEN
    assert error["n_prompt_tokens"] > MAX_SEQ_LEN
    r = http.post("/infill", json={"input_prefix": long, "n_predict": 2})  # infilling is cut to fit instead
    assert r.status_code == 200 and r.json()["truncated"] is True


@pytest.mark.parametrize("path, body, says", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] hi"}]}, "special tags"),
    ("/api/generate", {"model": NAME, "prompt": "x", "options": {"temperature": "hot"}}, "options.temperature"),
    ("/api/generate", {"prompt": "x"}, "model"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ("/completion", {"prompt": "x", "n_predict": True}, "n_predict"),
    ("/infill", {"input_prefix": "x", "input_extra": [{"text": 1}]}, "input_extra.0.text"),
])
def test_wrong_types_and_values_are_400_in_the_protocol_shape(http, path, body, says):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert says in message, message


def test_bad_bodies_unknown_fields_and_unknown_paths(http):
    assert http.post("/v1/completions", content=b"{oops").json()["error"]["type"] == "invalid_request_error"
    assert "JSON object" in http.post("/api/generate", content=b"[1]").json()["error"]
    assert http.post("/completion", content=b"[" * 100_000).status_code == 400  # too deep for the parser
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "frequency_penalty": 0.5, "user": "me"})
    assert ok.status_code == 200  # unknown optional fields are ignored
    form = http.post("/api/generate", content=json.dumps({"model": NAME, "prompt": "x", "stream": False,
                                                          "options": {"num_predict": 2}}),
                     headers={"content-type": "application/x-www-form-urlencoded"})  # what curl -d sends
    assert form.status_code == 200 and form.json()["done"]
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert http.get("/api/nothing").json() == {"error": "Not Found"}
    assert http.get("/completion").status_code == 405


def test_the_model_field_is_a_name_never_a_path(tiny, http):
    for name in ("../../etc/passwd", "/work/serve/codellama/assets/tiny", "llama3"):
        r = http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == NAME  # served as the one model, as llama.cpp does
    service = make_service(tiny)
    service.strict_model_name = True
    with running(service) as strict, httpx.Client(base_url=strict.url, timeout=30) as client:
        for name in ("../../etc/passwd", "/work/serve/codellama/assets/tiny", "llama3"):
            r = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
            assert r.status_code == 404 and "not found" in r.json()["error"]["message"]


def test_the_api_key_guards_every_endpoint_and_the_body_is_bounded(tiny):
    with running(make_service(tiny), api_key="s3cret", max_body_bytes=2000) as guarded, \
            httpx.Client(base_url=guarded.url, timeout=30) as http:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/api/tags"),
                             ("POST", "/api/generate"), ("GET", "/health"), ("POST", "/infill"), ("GET", "/docs")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = http.request(method, path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        key = {"Authorization": "Bearer s3cret"}
        assert http.get("/api/tags", headers=key).status_code == 200
        assert http.get("/health", headers=key).json() == {"status": "ok"}
        with openai.OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0) as oai:
            assert oai.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason
        r = http.post("/api/generate", headers=key, json={"model": NAME, "prompt": "x" * 3000})
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]


def test_infilling_and_chat_are_refused_by_a_model_without_them(tiny):
    plain = copy.copy(tiny.tokenizer)  # a tokenizer without FIM pieces, like a Llama 2 or stories model
    plain.prefix_id = plain.suffix_id = plain.middle_id = plain.eot_id = None
    with running(make_service(tiny, tokenizer=plain)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
        assert r.status_code == 400 and "cannot infill" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "<PRE> a <SUF>b <MID>"})
        assert r.status_code == 400 and "cannot infill" in r.json()["error"]["message"]
        r = http.post("/api/chat", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no instruct format" in r.json()["error"]
        assert ".Suffix" not in http.post("/api/show", json={"model": NAME}).json()["template"]


# ----------------------------------------------------------------------------- logging and shutdown
def test_one_log_line_per_request(http, caplog):
    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "codellama.serve"]

    with caplog.at_level("INFO", logger="codellama.serve"):
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0})
        http.get("/api/tags")
        wait_until(lambda: len(lines()) >= 2)  # written when each response has ended, on the server's thread
    lines = lines()
    assert len(lines) == 2
    assert re.fullmatch(r"POST /v1/completions 200 prompt=\d+ cached=\d+ completion=3 \d+\.\d{3}s", lines[0])
    assert re.fullmatch(r"GET /api/tags 200 - \d+\.\d{3}s", lines[1])


def test_shutdown_ends_in_flight_streams_and_leaves_no_thread(tiny):
    before = set(threading.enumerate())
    with running(make_service(tiny)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        body = {"model": NAME, "prompt": PROMPTS[0], "stream": True, "options": {"num_predict": MAX_SEQ_LEN}}
        with http.stream("POST", "/api/generate", json=body) as r:
            lines = r.iter_lines()
            assert not json.loads(next(lines))["done"]
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            rest = [json.loads(line) for line in lines if line]
        stopper.join()
    assert "shutting down" in rest[-1]["error"]
    left = set(threading.enumerate()) - before
    assert not left, left


def test_the_command_line_builds_the_llamas_own_engine_with_speculation(tiny):
    """``python -m codellama.serve --speculate prompt --quantize int8``: the server's engine is the Llama's, queue
    bound, quantized weights and speculator included, and a completion through it is the plain greedy one."""
    from codellama.cli.serve import build_service, parser
    from codellama.engine.speculative import PromptLookup
    args = parser().parse_args(["--max_seq_len", str(MAX_SEQ_LEN), "--max_waiting", "3", "--speculate", "prompt",
                                "--device", "cpu", "--quantize", "int8"])
    service = build_service(args)
    assert isinstance(service.engine.speculator, PromptLookup) and service.engine.max_waiting == 3
    from codellama.quantize import model_quantization
    assert model_quantization(service.engine.model) == "int8"
    with running(service) as handle, httpx.Client(base_url=handle.url, timeout=30) as client:
        body = {"model": NAME, "prompt": PROMPTS[0] * 3, "max_tokens": N, "temperature": 0}
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    quantized = Llama(service.engine.model, tiny.tokenizer, MAX_SEQ_LEN, 1)
    [tokens], _ = quantized.generate([tiny.tokenizer.encode(PROMPTS[0] * 3, bos=True, eos=False)], N, temperature=0)
    assert text == tiny.tokenizer.decode_infilling(tokens)  # speculation changes nothing
