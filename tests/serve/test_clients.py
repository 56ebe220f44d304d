"""The OpenAI and Ollama protocols as the official clients use them (the ``openai`` and ``ollama`` packages):
log-probabilities with one text per token, Mistral's FIM endpoint, the OpenAI fields clients read, a chat that
continues the assistant's answer, and the bundled model served as ``Llama`` serves it."""

import json

import httpx
import ollama
import openai
import pytest
from test_serve import DIALOG, NAME, PREFIX, SUFFIX, completed, infilled, make_service, running, sse_data
from test_serve import http, oai, srv, tiny  # noqa: F401 (fixtures: the bundled model served in this module)

from codellama.engine import SamplingParams
from codellama.build import BUNDLED_CONTEXT_LEN, BUNDLED_MAX_GEN_LEN
from codellama.prompts import chat_prompt_tokens, chat_stop_ids

N = 16


@pytest.fixture
def oll(srv):
    return ollama.Client(host=srv.url, timeout=60)


def answer_tokens(tiny, dialog, n=N):
    """Greedy ``chat_completion``'s tokens for ``dialog``, as the server's chat makes them."""
    t = tiny.tokenizer
    [tokens], _ = tiny.generate([chat_prompt_tokens(t, dialog)], n, temperature=0, stop_token=chat_stop_ids(t, False))
    return tokens


# ----------------------------------------------------------------------------- log-probabilities
def piece(tiny, token):
    return tiny.tokenizer.token_piece(token).replace("\u2581", " ")


def test_chat_logprobs_give_one_text_per_token(tiny, oai, oll):
    """Greedy: the chosen token is the likeliest, so its text and its top alternative's are the same string,
    the token's own piece with its leading space (also for an answer's first token, whose decoded text drops
    it), on OpenAI chat (whole and streamed) and Ollama chat (whole and streamed)."""
    tokens = answer_tokens(tiny, DIALOG)
    pieces = [piece(tiny, t) for t in tokens]
    assert pieces[0].startswith(" ")  # the case that differed: 'def' for the chosen, ' def' for the alternative

    def check(entries):
        assert [e["token"] for e in entries] == pieces
        for e in entries:
            top = e["top_logprobs"][0]
            assert top["token"] == e["token"] and top["logprob"] == pytest.approx(e["logprob"])
            if "bytes" in e:  # the ollama package keeps no bytes
                assert e["bytes"] == list(e["token"].encode()) == e["top_logprobs"][0]["bytes"]

    kw = dict(model=NAME, messages=DIALOG, max_tokens=N, temperature=0, logprobs=True, top_logprobs=2)
    whole = oai.chat.completions.create(**kw)
    check([e.model_dump() for e in whole.choices[0].logprobs.content])
    assert whole.choices[0].message.content == tiny.tokenizer.decode(tokens)
    streamed = [e.model_dump() for c in oai.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    check(streamed)
    options = {"temperature": 0, "num_predict": N}
    reply = oll.chat(model=NAME, messages=DIALOG, options=options, logprobs=True, top_logprobs=2)
    check([e.model_dump() for e in reply.logprobs])
    check([e.model_dump() for part in oll.chat(model=NAME, messages=DIALOG, options=options, logprobs=True,
                                               top_logprobs=2, stream=True) for e in (part.logprobs or [])])


def test_a_byte_token_reports_its_byte(tiny):
    """A character split over byte pieces: each token reports its own byte, so the bytes join to the text."""
    service = make_service(tiny, max_batch_size=1)
    sp = tiny.tokenizer.sp_model
    ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "é".encode()]
    assert [service.piece_text(i) for i in ids] == ["bytes:\\xc3", "bytes:\\xa9"]
    assert bytes(b for i in ids for b in service.piece_bytes(i)).decode() == "é"
    assert service.piece_text(tiny.tokenizer.bos_id) == "" and service.piece_bytes(tiny.tokenizer.eos_id) == []


# ----------------------------------------------------------------------------- FIM endpoint
def test_fim_completions_is_text_infilling(tiny, http):
    """``POST /v1/fim/completions`` as Continue's FIM providers send it (``prompt``, ``suffix``, ``stream``):
    ``text_infilling``'s middle, as ``choices[0].message.content`` or streamed ``choices[0].delta.content``."""
    body = {"model": NAME, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 24, "temperature": 0}
    expected = infilled(tiny)
    whole = http.post("/v1/fim/completions", json=body).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["finish_reason"] in ("stop", "length") and whole["usage"]["completion_tokens"] <= 24
    with http.stream("POST", "/v1/fim/completions", json={**body, "stream": True}) as r:
        chunks = sse_data(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    plain = http.post("/v1/fim/completions", json={"model": NAME, "prompt": "import os\n", "max_tokens": 8,
                                                  "temperature": 0, "random_seed": 1}).json()  # no suffix: completion
    assert plain["choices"][0]["message"]["content"] == completed(tiny, "import os\n", 8)
    for bad, says in [({"prompt": 3}, "prompt"), ({"prompt": "x", "n": 2}, "one choice"), ({}, "prompt")]:
        r = http.post("/v1/fim/completions", json=bad)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    # Another model's name is served, as on every path (llama-server's rule; --strict_model_name makes it a 404).
    assert http.post("/v1/fim/completions", json={"model": "other", "prompt": "x", "max_tokens": 1}).status_code == 200


# ----------------------------------------------------------------------------- OpenAI fields
def test_fingerprint_cached_tokens_and_the_role_chunk(oai, http):
    prompt = "def cached_prefix_check(values):\n    total = 0\n"
    first = oai.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    again = oai.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert first.system_fingerprint == again.system_fingerprint and first.system_fingerprint.startswith("fp_")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens  # the prefix was reused
    n2 = oai.completions.create(model=NAME, prompt=prompt + "x", max_tokens=2, n=2, temperature=0)
    assert n2.usage.prompt_tokens_details.cached_tokens <= n2.usage.prompt_tokens  # one prompt, counted once
    chat = oai.chat.completions.create(model=NAME, messages=DIALOG, max_tokens=2)
    assert chat.system_fingerprint == first.system_fingerprint
    body = {"model": NAME, "messages": DIALOG, "max_tokens": 3, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = sse_data(r)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": None}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert all(c["system_fingerprint"] == first.system_fingerprint for c in chunks)
    assert "cached_tokens" in chunks[-1]["usage"]["prompt_tokens_details"]


# ----------------------------------------------------------------------------- prefill
def test_a_chat_ending_with_the_assistant_continues_its_answer(tiny, oai, oll):
    """The answer so far (``[/INST] {answer}`` without EOS) is continued: the new text is what the model writes
    next, keeping its leading space, so that the answer so far followed by it is the whole greedy answer."""
    tokens = answer_tokens(tiny, DIALOG, 2 * N)
    t = tiny.tokenizer
    cut = next(k for k in range(3, N) if piece(tiny, tokens[k]).startswith(" "))  # the rest starts a word
    so_far, rest = t.decode(tokens[:cut]), t.decode_infilling(tokens[cut:])
    prefilled = DIALOG + [{"role": "assistant", "content": so_far}]
    assert chat_prompt_tokens(t, prefilled) == chat_prompt_tokens(t, DIALOG) + tokens[:cut]  # the same prompt
    assert rest.startswith(" ") and so_far + rest == t.decode(tokens)
    n = len(tokens) - cut
    out = oai.chat.completions.create(model=NAME, messages=prefilled, max_tokens=n, temperature=0)
    assert out.choices[0].message.content == rest
    streamed = oai.chat.completions.create(model=NAME, messages=prefilled, max_tokens=n, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == rest
    reply = oll.chat(model=NAME, messages=prefilled, options={"temperature": 0, "num_predict": n})
    assert reply.message.content == rest
    plain = oai.chat.completions.create(model=NAME, messages=DIALOG + [{"role": "assistant", "content": ""}],
                                        max_tokens=N, temperature=0)  # nothing so far: a new answer
    assert plain.choices[0].message.content == t.decode(tokens[:N])
    with pytest.raises(openai.BadRequestError, match="special tags"):
        oai.chat.completions.create(model=NAME, max_tokens=2,
                                    messages=DIALOG + [{"role": "assistant", "content": "[/INST] x"}])
    with pytest.raises(openai.BadRequestError, match="roles must"):
        oai.chat.completions.create(model=NAME, max_tokens=2, messages=[DIALOG[1], DIALOG[1]])


# ----------------------------------------------------------------------------- control pieces
def test_a_chat_answer_ends_at_a_control_piece(tiny, oai):
    """The bundled model also learnt infilling and sometimes ends a chat answer with ``<EOT>`` (or writes a
    stray ``<MID>``) as a control id, which decoding turns into the text " <EOT>". The answer now ends there,
    on the server and in ``Llama.chat_completion``."""
    t = tiny.tokenizer
    dialog = [{"role": "user", "content": "Sort a list of dicts by key."}]
    prompt = chat_prompt_tokens(t, dialog)
    found = None
    for seed in range(64):  # sampled answers that stop only at EOS, as before; the first with a control id
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=96, stop_token_ids=(t.eos_id,), seed=seed)
        tokens = tiny.engine.submit(prompt, params).result().tokens
        at = next((k for k, x in enumerate(tokens) if x in t.control_ids), None)
        if at is not None:
            found = seed, tokens, at
            break
    assert found, "no sampled answer held a control id"
    seed, tokens, at = found
    assert any(p in t.decode(tokens) for p in ("<EOT>", "<MID>", "<PRE>", "<SUF>"))  # what clients saw
    out = oai.chat.completions.create(model=NAME, messages=dialog, max_tokens=96, temperature=1.0, top_p=1.0,
                                      seed=seed)
    assert out.choices[0].message.content == t.decode(tokens[:at]) and out.choices[0].finish_reason == "stop"
    assert "<" not in out.choices[0].message.content[-6:]


# ----------------------------------------------------------------------------- the bundled model
def test_the_bundled_model_is_served_as_llama_serves_it():
    """``python -m codellama.serve`` with no checkpoint: a request without a bound gets the 128-token cap of
    the startup notice (OpenAI chat, Ollama's ``num_predict: -1``), a bound is honoured, and the context
    advertised is the 512 tokens it was trained on."""
    from codellama.cli.serve import build_service, parser
    service = build_service(parser().parse_args(["--device", "cpu", "--max_batch_size", "2"]))
    assert service.default_max_tokens == BUNDLED_MAX_GEN_LEN and service.context_length == BUNDLED_CONTEXT_LEN
    rambling = [{"role": "user", "content": "Reverse a string."}]  # greedy, it never stops by itself
    with running(service) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert card["context_length"] == card["max_model_len"] == BUNDLED_CONTEXT_LEN
        shown = http.post("/api/show", json={"model": "codellama-tiny"}).json()
        assert shown["model_info"]["llama.context_length"] == BUNDLED_CONTEXT_LEN
        assert f"num_ctx {BUNDLED_CONTEXT_LEN}" in shown["parameters"]
        chat = http.post("/v1/chat/completions", json={"messages": rambling, "temperature": 0}).json()
        assert chat["usage"]["completion_tokens"] == BUNDLED_MAX_GEN_LEN
        assert chat["choices"][0]["finish_reason"] == "length"
        body = {"model": "codellama-tiny", "messages": rambling, "stream": False,
                "options": {"temperature": 0, "num_predict": -1}}
        assert http.post("/api/chat", json=body).json()["eval_count"] == BUNDLED_MAX_GEN_LEN
        longer = http.post("/v1/chat/completions", json={"messages": rambling, "temperature": 0,
                                                         "max_tokens": BUNDLED_MAX_GEN_LEN + 20}).json()
        assert longer["usage"]["completion_tokens"] == BUNDLED_MAX_GEN_LEN + 20


# ----------------------------------------------------------------------------- the ollama package
def test_the_ollama_package(tiny, oll):
    """What Continue's and other Ollama clients call, through the official ``ollama`` package."""
    [model] = oll.list().models
    assert model.model == NAME + ":latest"
    shown = oll.show(NAME)
    assert ".Suffix" in shown.template and "insert" in shown.capabilities
    out = oll.generate(model=NAME, prompt=PREFIX, suffix=SUFFIX, options={"temperature": 0, "num_predict": 24})
    assert out.response == infilled(tiny) and out.done
    parts = list(oll.generate(model=NAME, prompt=PREFIX, suffix=SUFFIX, stream=True,
                              options={"temperature": 0, "num_predict": 24}))
    assert "".join(p.response for p in parts) == out.response and parts[-1].eval_count == out.eval_count
    reply = oll.chat(model=NAME, messages=DIALOG, options={"temperature": 0, "num_predict": N})
    assert reply.message.role == "assistant"
    assert reply.message.content == tiny.tokenizer.decode(answer_tokens(tiny, DIALOG))
    # Another model's name is served (llama-server's rule; --strict_model_name makes it a 404, tested elsewhere).
    assert oll.chat(model="llama3", messages=DIALOG, options={"num_predict": 2}).message.role == "assistant"


def test_the_ollama_package_with_a_key(tiny):
    with running(make_service(tiny, max_batch_size=1), api_key="k3y") as srv:
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=srv.url).list()
        assert refused.value.status_code == 401
        keyed = ollama.Client(host=srv.url, headers={"Authorization": "Bearer k3y"})
        assert keyed.generate(model=NAME, prompt="x", options={"num_predict": 2}).done


def test_raw_first_chunk_is_json_null(http):
    """Some clients test the first delta's ``content`` against null (not empty) to find the role chunk."""
    body = {"model": NAME, "messages": DIALOG, "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert '"content": null' in first
