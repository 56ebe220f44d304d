"""Through the real server on 127.0.0.1: one user's odd request never ends other users' streams."""

import asyncio
import json

import httpx
import pytest

from test_serve import NAME, PROMPTS, completed, make_service, running

from codellama import Llama
from codellama.engine.detokenizer import MAX_STOP_STRINGS

N = 16


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=256, max_batch_size=8, device="cpu")


async def _lines(response):
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])
        elif line.startswith("{"):
            yield json.loads(line)


async def openai_stream(client, prompt, temperature=0.0):
    body = {"model": NAME, "prompt": prompt, "max_tokens": N, "temperature": temperature, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return "".join([e["choices"][0]["text"] async for e in _lines(r)])


async def ollama_stream(client, prompt):
    body = {"model": NAME, "prompt": prompt, "options": {"temperature": 0, "num_predict": N}}
    async with client.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        return "".join([e.get("response", "") async for e in _lines(r)])


async def llamacpp_stream(client, prompt):
    body = {"prompt": prompt, "n_predict": N, "temperature": 0, "stream": True}
    async with client.stream("POST", "/completion", json=body) as r:
        assert r.status_code == 200
        return "".join([e.get("content", "") async for e in _lines(r)])


def test_a_temperature_too_small_for_float32_ends_no_ones_stream(tiny):
    solo = [completed(tiny, p, N) for p in PROMPTS[:4]]

    async def together(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(openai_stream(client, PROMPTS[0], temperature=1e-46),
                                        openai_stream(client, PROMPTS[1]), ollama_stream(client, PROMPTS[2]),
                                        llamacpp_stream(client, PROMPTS[3]))

    with running(make_service(tiny)) as srv:
        texts = asyncio.run(together(srv.url))
    assert texts == solo  # the first greedy, as at temperature 0; the other users' streams untouched


def test_too_many_stop_strings_are_a_400_that_says_the_bound(tiny):
    stops = ["x" * 300] * 10_000
    with running(make_service(tiny)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for path, body, message in (
                ("/v1/completions", {"model": NAME, "prompt": "x", "stop": stops}, lambda j: j["error"]["message"]),
                ("/api/generate", {"model": NAME, "prompt": "x", "stream": False, "options": {"stop": stops}},
                 lambda j: j["error"]),
                ("/completion", {"prompt": "x", "stop": stops}, lambda j: j["error"]["message"])):
            r = http.post(path, json=body)
            assert r.status_code == 400, (path, r.text[:200])
            assert f"at most {MAX_STOP_STRINGS} are allowed" in message(r.json()), path
        # and the server still serves
        r = http.post("/v1/completions", json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
