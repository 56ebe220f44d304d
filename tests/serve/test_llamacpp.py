"""The llama.cpp protocol as editors use it, over real sockets, on real files (the standard library's sources)
with extra context: the request bodies llama.vim, llama.vscode, Continue, Tabby and Twinny send (read from their
sources), every field they send acted on, every field they read present, each answer checked against the
library's own greedy generation where it is deterministic."""

import functools
import heapq
import json
import json.decoder
import re
import string
import textwrap
import time

import httpx
import pytest

from codellama import Llama
from codellama.engine import Engine
from codellama.serve.llamacpp_api import Settings
from codellama.serve.service import ModelService
from test_serve import running, sse_data

MAX_SEQ_LEN = 512  # the bundled model's training context
SLOTS = 4
NAME = "codellama-tiny"
FILE = open(functools.__file__).read().splitlines(keepends=True)  # 1012 lines
OTHER_FILES = [json.decoder, textwrap, string, heapq]


def llama_vim_chunks(n: int, size: int = 32):
    """Extra context as llama.vim's ring buffer sends it: ``size``-line chunks of other files."""
    lines = [line.rstrip("\n") for m in OTHER_FILES for line in open(m.__file__)]
    return [{"text": "\n".join(lines[i * size:(i + 1) * size]) + "\n", "time": 1700000000 + i,
             "filename": OTHER_FILES[i % len(OTHER_FILES)].__file__} for i in range(n)]


def around(line: int, n_prefix: int = 256, n_suffix: int = 64):
    """llama.vim's local context at the end of ``line`` (1-based): the lines before, the cursor's line, the
    lines after (``s:fim_ctx_local``)."""
    before = [s.rstrip("\n") for s in FILE[max(0, line - 1 - n_prefix):line - 1]]
    after = [s.rstrip("\n") for s in FILE[line:line + n_suffix]]
    current = FILE[line - 1].rstrip("\n")
    indent = len(current) - len(current.lstrip())
    return "\n".join(before) + "\n", current, "\n" + "\n".join(after) + "\n", indent


def llama_vim_body(line: int, chunks, **over):
    prefix, middle, suffix, indent = around(line)
    body = {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": middle,
            "n_predict": 128, "stop": [], "n_indent": indent, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 250,
            "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                                "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                                "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                                "tokens_cached"]}
    return {**body, **over}


def llama_vscode_body(line: int, chunks, **over):
    prefix, middle, suffix, indent = around(line, 128, 64)
    body = {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": middle,
            "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 2500, **({"n_indent": indent} if indent else {})}
    return {**body, **over}


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=MAX_SEQ_LEN, max_batch_size=SLOTS, device="cpu")


def service_of(tiny, **kw) -> ModelService:
    engine = Engine(tiny.model, tiny.tokenizer, max_batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN)
    return ModelService(engine, tiny.tokenizer, NAME, **kw)


@pytest.fixture(scope="module")
def served(tiny):
    service = service_of(tiny, aliases=("codellama:7b", "code"), tags=("fim",))
    with running(service, llamacpp=Settings(model_path="/models/tiny")) as handle:
        yield service, handle


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[1].url, timeout=60) as client:
        yield client


def greedy(tiny, ids, n):
    [tokens], _ = tiny.generate([ids], n, temperature=0)
    return tokens


def greedy_text(tiny, ids, n, stop_ids):
    tokens = greedy(tiny, ids, n)
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tiny.tokenizer.decode_infilling(tokens[:cut]), tokens[:cut]


# ----------------------------------------------------------------------------- llama.vim
def test_llama_vim_on_a_1000_line_file_with_16_chunks_gets_a_fitted_suggestion(served, http):
    service, _ = served
    body = llama_vim_body(500, llama_vim_chunks(16))
    r = http.post("/infill", content=json.dumps(body))
    assert r.status_code == 200, r.text
    # llama.vim's check on the raw answer before it decodes it, then the fields it reads
    assert re.search(r'^\s*\{', r.text) and re.search(r'"content"\s*:"', r.text)
    out = r.json()
    assert set(out) == set(body["response_fields"])
    assert out["truncated"] is True and isinstance(out["content"], str)
    assert 0 < out["timings/prompt_n"] <= MAX_SEQ_LEN - 128 and out["timings/predicted_n"] <= 128
    assert all(isinstance(out[k], float) for k in body["response_fields"] if k.endswith(("_ms", "_second")))
    assert out["timings/predicted_ms"] < 250 + 1000  # t_max_predict_ms, plus at most the line it finishes


def test_the_fitted_prompt_is_text_infilling_of_what_was_kept(tiny, served, http):
    """Greedy, no stopping rule of the editor's: the answer is the library's own greedy infilling of the prompt
    the service fits (which keeps the prefix's end and the suffix's start, tested in test_fitting.py)."""
    service, _ = served
    body = llama_vim_body(500, llama_vim_chunks(16), samplers=["temperature"], temperature=0, n_indent=0,
                          t_max_predict_ms=-1, n_predict=24, response_fields=[])
    out = http.post("/infill", json=body).json()
    extra = "".join(c["text"] + "\n\n" for c in body["input_extra"])
    prompt = service.infill(body["input_prefix"] + body["prompt"], body["input_suffix"], extra=extra, reserve=24)
    assert prompt.truncated and out["truncated"] and out["tokens_evaluated"] == len(prompt.ids)
    assert out["prompt"] == service.render(prompt.ids) and out["prompt"].startswith("<s> <PRE>")
    text, tokens = greedy_text(tiny, prompt.ids, 24, prompt.stop_ids)
    assert out["content"] == text and out["tokens_predicted"] == len(tokens)
    assert out["stop_type"] == ("eos" if len(tokens) < 24 else "limit")


def test_a_warm_up_request_caches_the_extra_context_for_the_next_suggestion(http):
    """llama.vim and llama.vscode send the extra context alone with n_predict 0 when it changes; the next
    suggestion reuses its evaluation (the slot whose cache shares the longest prefix serves it)."""
    chunks = llama_vim_chunks(2, 8)
    warm = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "",
            "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
    r = http.post("/infill", json=warm)
    assert r.status_code == 200 and r.json() == {}
    full = http.post("/infill", json={**warm, "response_fields": []}).json()
    assert full["content"] == "" and full["tokens_predicted"] == 0 and full["stop_type"] == "limit"
    body = {**warm, "input_prefix": "".join(FILE[:12]), "input_suffix": "".join(FILE[13:20]), "prompt": "",
            "n_predict": 8, "response_fields": ["timings/cache_n", "timings/prompt_n", "tokens_cached"]}
    out = http.post("/infill", json=body).json()
    assert out["timings/cache_n"] >= 16 and out["tokens_cached"] == out["timings/cache_n"]


def test_n_indent_ends_the_answer_before_a_less_indented_line(http):
    for start in range(0, 1000, 50):  # a greedy answer of several lines whose indentation varies
        base = {"prompt": "".join(FILE[start:start + 30]), "n_predict": 64, "temperature": 0}
        lines = http.post("/completion", json=base).json()["content"].split("\n")
        indents = [len(s) - len(s.lstrip(" \t")) if s.strip() else 0 for s in lines[1:-1]]
        if len(set(indents)) > 1:
            break
    else:
        pytest.fail("no greedy answer with lines of different indentation")
    n_indent = max(indents)  # the first later line indented less than this ends the answer, before that line
    cut = next(i for i, d in enumerate(indents, start=1) if d < n_indent)
    out = http.post("/completion", json={**base, "n_indent": n_indent}).json()
    assert out["content"] == "\n".join(lines[:cut]) and out["stop_type"] == "limit"


def test_t_max_predict_ms_ends_the_answer_at_a_new_line_after_the_time_budget(tiny, http):
    prompt = "".join(FILE[100:125])
    free = http.post("/completion", json={"prompt": prompt, "n_predict": 64, "temperature": 0}).json()
    tokens = http.post("/completion", json={"prompt": prompt, "n_predict": 64, "temperature": 0,
                                            "return_tokens": True}).json()["tokens"]
    pieces = [tiny.tokenizer.decode_infilling(tokens[:i + 1])[len(tiny.tokenizer.decode_infilling(tokens[:i])):]
              for i in range(len(tokens))]
    first_newline = next(i for i, p in enumerate(pieces) if i > 0 and "\n" in p)
    out = http.post("/completion", json={"prompt": prompt, "n_predict": 64, "temperature": 0,
                                         "t_max_predict_ms": 1}).json()
    assert out["content"] == "".join(pieces[:first_newline + 1]) and free["content"].startswith(out["content"])
    assert out["stop_type"] == "limit" and out["tokens_predicted"] == first_newline + 1


# ----------------------------------------------------------------------------- llama.vscode
def test_llama_vscode_gets_its_three_completions_and_its_status_line_reads_them(http):
    body = llama_vscode_body(700, llama_vim_chunks(8))
    r = http.post("/infill", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    # getComplFromContent: an object with "content" is one completion, else an array of them
    assert isinstance(data, list) and len(data) == 3 and [d["index"] for d in data] == [0, 1, 2]
    completions = list(dict.fromkeys(d["content"] for d in data))
    assert completions and all(isinstance(c, str) for c in completions)
    for d in data:  # statusbar.showInfo of each: nothing it reads is missing
        assert d["generation_settings"]["n_ctx"] == MAX_SEQ_LEN and isinstance(d["tokens_cached"], int)
        for key in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                    "predicted_per_second"):
            assert isinstance(d["timings"][key], (int, float)), key
    assert len({d["generation_settings"]["seed"] for d in data}) in (1, 3)
    one = http.post("/infill", json={**body, "n_cmpl": 1}).json()  # one completion: an object
    assert isinstance(one, dict) and one["generation_settings"]["n_ctx"] == MAX_SEQ_LEN
    seeded = http.post("/infill", json={**body, "seed": 7}).json()
    assert [d["generation_settings"]["seed"] for d in seeded] == [7, 8, 9]  # distinct answers for one prompt


def test_llama_vscode_preparation_request_and_n_cmpl_out_of_range(http):
    prep = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": llama_vim_chunks(4), "prompt": "",
            "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    assert http.post("/infill", json=prep).json()["content"] == ""
    r = http.post("/infill", json=llama_vscode_body(100, [], n_cmpl=7))
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("Field 'n_cmpl': Value must be between")  # what it recognises
    assert http.post("/completion", json={"prompt": "x", "n": 2, "n_predict": 1}).json()[1]["index"] == 1


# ----------------------------------------------------------------------------- Continue, Tabby, Twinny
def fim_text(prefix, suffix):
    return f"<PRE> {prefix} <SUF>{suffix} <MID>"


@pytest.mark.parametrize("client", ["continue", "tabby", "twinny"])
def test_fim_text_clients_stream_from_completion(tiny, served, http, client):
    """Continue's llama.cpp provider, Tabby's ``llama.cpp/completion`` and Twinny send the FIM prompt spelled as
    text to /completion and read ``content`` (and ``stop``) from each event; the prompt of a 300+ line file is
    fitted like /infill's, and greedy answers are the library's."""
    service, _ = served
    prefix, suffix = "".join(FILE[:300]), "".join(FILE[300:360])
    prompt = fim_text(prefix, suffix)
    body = {"continue": {"prompt": prompt, "stream": True, "n_predict": 24, "stop": ["<EOT>"], "temperature": 0},
            "tabby": {"seed": 2**64 - 1, "prompt": prompt, "n_predict": 24, "temperature": 0.0, "stream": True,
                      "penalty_last_n": 0, "presence_penalty": 0.0},
            "twinny": {"prompt": prompt, "stream": True, "temperature": 0, "n_predict": 24}}[client]
    with http.stream("POST", "/completion", json=body) as r:
        events = sse_data(r)
    assert all(isinstance(e["content"], str) and isinstance(e["stop"], bool) for e in events)  # Tabby unwraps both
    assert events[-1]["stop"] and not any(e["stop"] for e in events[:-1])
    expected = service.infill(prefix, suffix, text=prompt, reserve=24)  # room for n_predict
    assert expected.truncated and events[-1]["truncated"]
    text, _ = greedy_text(tiny, expected.ids, 24, expected.stop_ids)
    assert "".join(e["content"] for e in events) == text


# ----------------------------------------------------------------------------- the fields, one by one
def test_response_fields_flatten_nested_fields_and_leave_out_missing_ones(http):
    out = http.post("/completion", json={"prompt": "import os\n", "n_predict": 4, "response_fields": [
        "content", "generation_settings/n_predict", "timings/cache_n", "prompt", "nope", "timings/nope"]}).json()
    assert set(out) == {"content", "generation_settings/n_predict", "timings/cache_n", "prompt"}
    assert out["generation_settings/n_predict"] == 4 and out["prompt"] == "<s> import os\n"


@pytest.mark.parametrize("stream", [False, True])
def test_n_probs_gives_completion_probabilities(tiny, http, stream):
    body = {"prompt": "def add(a, b):\n", "n_predict": 5, "n_probs": 3, "temperature": 0, "stream": stream}
    if stream:
        with http.stream("POST", "/completion", json=body) as r:
            events = sse_data(r)
        probs = [p for e in events[:-1] for p in e["completion_probabilities"]]
        assert all(len(e["completion_probabilities"]) == 1 for e in events[:-1])
    else:
        probs = http.post("/completion", json=body).json()["completion_probabilities"]
    assert len(probs) == 5
    for p in probs:
        top = p["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["id"] == p["id"] and top[0]["logprob"] == pytest.approx(p["logprob"])  # greedy: the likeliest
        assert p["bytes"] == list(p["token"].encode()) and all(t["logprob"] <= 0 for t in top)
    ids = tiny.tokenizer.encode("def add(a, b):\n", bos=True, eos=False)
    assert [p["id"] for p in probs] == greedy(tiny, ids, 5)


def test_samplers_choose_which_of_temperature_top_k_top_p_apply(http):
    def settings(**body):
        return http.post("/completion", json={"prompt": "x", "n_predict": 1, **body}).json()["generation_settings"]

    vim = settings(samplers=["top_k", "top_p", "infill"], top_k=40, top_p=0.9)  # no temperature: the model's own
    assert (vim["temperature"], vim["top_k"], vim["top_p"], vim["samplers"]) == (1.0, 40, 0.9, ["top_k", "top_p"])
    none = settings(samplers=[])
    assert (none["temperature"], none["top_k"], none["top_p"], none["samplers"]) == (1.0, 0, 1.0, [])
    chars = settings(samplers="kt", temperature=0.5)  # llama.cpp's one letter per sampler
    assert (chars["temperature"], chars["top_k"], chars["top_p"]) == (0.5, 40, 1.0)
    default = settings()
    assert default["temperature"] == 0.8 and default["samplers"] == ["temperature", "top_k", "top_p"]


def test_greedy_completion_stop_words_and_the_fields_editors_read(tiny, http):
    prompt = "".join(FILE[100:125])
    ids = tiny.tokenizer.encode(prompt, bos=True, eos=False)
    text, tokens = greedy_text(tiny, ids, 32, (tiny.tokenizer.eos_id,))
    out = http.post("/completion", json={"prompt": prompt, "n_predict": 32, "temperature": 0,
                                         "return_tokens": True}).json()
    assert out["content"] == text and out["tokens"] == tokens and out["tokens_evaluated"] == len(ids)
    assert out["stop"] is True and out["stop_type"] == "limit" and out["truncated"] is False
    assert out["has_new_line"] == ("\n" in text) and out["model"] == NAME
    t = out["timings"]
    assert t["prompt_n"] + t["cache_n"] == len(ids) and t["predicted_n"] == 32
    assert t["predicted_per_second"] == pytest.approx(1000 * 32 / t["predicted_ms"])
    word = text.strip().split()[1]
    stopped = http.post("/completion", json={"prompt": prompt, "n_predict": 32, "temperature": 0,
                                             "stop": [word]}).json()
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == word
    assert stopped["content"] == text[:text.index(word)]


def test_streamed_chunks_carry_their_tokens_and_the_last_one_the_result(tiny, http):
    body = {"prompt": "import os\n", "n_predict": 6, "temperature": 0, "stream": True, "n_cmpl": 2}
    with http.stream("POST", "/completion", json=body) as r:
        events = sse_data(r)
    for index in (0, 1):
        mine = [e for e in events if e["index"] == index]
        assert all(len(e["tokens"]) == 1 and not e["stop"] for e in mine[:-1])
        assert mine[-1]["stop"] and mine[-1]["tokens"] == [] and mine[-1]["timings"]["predicted_n"] == 6
        ids = tiny.tokenizer.encode("import os\n", bos=True, eos=False)
        assert [e["tokens"][0] for e in mine[:-1]] == greedy(tiny, ids, 6)
        assert "".join(e["content"] for e in mine) == tiny.tokenizer.decode_infilling(greedy(tiny, ids, 6))


def test_input_extra_chunks_are_validated(http):
    base = {"input_prefix": "def f():\n", "input_suffix": "\n", "n_predict": 1}
    for chunk, says in [({}, "input_extra.0.text"), ({"filename": "ok"}, "input_extra.0.text"),
                        ({"filename": 123, "text": "abc"}, "input_extra.0.filename"),
                        ({"text": 456}, "input_extra.0.text")]:
        r = http.post("/infill", json={**base, "input_extra": [chunk]})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    assert http.post("/infill", json={**base, "input_extra": [{"text": "x = 1\n", "time": 5}]}).status_code == 200


def test_a_prompt_longer_than_the_context_is_exceed_context_size_error(http):
    long = "word " * MAX_SEQ_LEN
    for stream in (False, True):
        r = http.post("/completion", json={"prompt": long, "stream": stream})
        error = r.json()["error"]
        assert r.status_code == 400 and error["type"] == "exceed_context_size_error"
        assert error["n_ctx"] == MAX_SEQ_LEN and error["n_prompt_tokens"] > MAX_SEQ_LEN
    r = http.post("/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "exceed_context_size_error"


def test_id_slot_is_checked_and_reported(http):
    assert http.post("/completion", json={"prompt": "x", "n_predict": 1, "id_slot": SLOTS}).status_code == 400
    out = http.post("/completion", json={"prompt": "x", "n_predict": 1, "id_slot": 1}).json()
    assert 0 <= out["id_slot"] < SLOTS and out["generation_settings"]["id_slot"] == 1


def test_prompts_as_ids_mixed_and_several(tiny, http):
    ids = http.post("/tokenize", json={"content": "import os", "add_special": True}).json()["tokens"]
    assert ids[0] == tiny.tokenizer.bos_id
    one = http.post("/completion", json={"prompt": ids, "n_predict": 4, "temperature": 0}).json()
    several = http.post("/completion", json={"prompt": [ids, "import os"], "n_predict": 4, "temperature": 0}).json()
    assert [s["content"] for s in several] == [one["content"]] * 2
    mixed = http.post("/completion", json={"prompt": ["import", 1, 2], "n_predict": 1}).json()
    assert mixed["tokens_evaluated"] == 1 + len(tiny.tokenizer.encode("import", bos=False, eos=False)) + 2
    assert http.post("/completion", json={"prompt": {"prompt_string": "import os"}, "n_predict": 1}).status_code == 200
    assert http.post("/completion", json={"prompt": [[1, 99999]]}).status_code == 400


# ----------------------------------------------------------------------------- endpoints
def test_tokenize_detokenize_props_slots_models_template_health(tiny, served, http):
    service, _ = served
    text = "This is a test 媽 🤗"
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == tiny.tokenizer.encode(text, bos=False, eos=False)
    assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == text
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens
    raw = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces)
    assert raw.decode() == " " + text  # SentencePiece's leading space; byte pieces as lists of bytes
    props = http.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == MAX_SEQ_LEN and props["total_slots"] == SLOTS
    assert props["model_path"] == "/models/tiny" and props["default_generation_settings"]["params"]["top_k"] == 40
    assert http.post("/props", json={}).status_code == 501
    slots = http.get("/slots").json()
    assert [s["id"] for s in slots] == list(range(SLOTS)) and all(s["n_ctx"] == MAX_SEQ_LEN for s in slots)
    assert not any(s["is_processing"] for s in slots) and all("params" not in s for s in slots)
    models = http.get("/models").json()["data"][0]
    assert models["id"] == NAME and models["aliases"] == [NAME, "codellama:7b", "code"] and models["tags"] == ["fim"]
    template = http.post("/apply-template", json={"messages": [{"role": "user", "content": "Reverse a string."}]})
    assert template.json()["prompt"] == "<s> [INST] Reverse a string. [/INST]"
    counted = http.post("/chat/completions/input_tokens", json={"messages": [{"role": "user", "content": "Hi."}]})
    assert counted.json() == {"input_tokens": len(tiny.tokenizer.encode("[INST] Hi. [/INST]", bos=True, eos=False))}
    assert http.get("/health").json() == http.get("/v1/health").json() == {"status": "ok"}
    chat = http.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert "content" in http.post("/completions", json={"prompt": "x", "n_predict": 1}).json()  # llama.cpp's


def test_slots_can_be_turned_off_and_show_busy_slots(tiny):
    with running(service_of(tiny), llamacpp=Settings(slots=False)) as off, httpx.Client(base_url=off.url) as http:
        r = http.get("/slots")
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"
    with running(service_of(tiny)) as on, httpx.Client(base_url=on.url, timeout=60) as http:
        with http.stream("POST", "/completion", json={"prompt": "import os\n", "n_predict": 200, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            busy = [s for s in http.get("/slots").json() if s["is_processing"]]
        assert len(busy) == 1 and busy[0]["n_prompt_tokens"] == 4 and busy[0]["next_token"][0]["n_decoded"] >= 1
        time.sleep(0.5)  # the stream was closed: its slot is free at the next step
        assert not any(s["is_processing"] for s in http.get("/slots").json())


def test_model_names_aliases_and_the_strict_flag(tiny):
    lenient = service_of(tiny, aliases=("code",))
    strict = service_of(tiny, aliases=("code",), strict_model_name=True)
    with running(lenient) as a, running(strict) as b, httpx.Client(timeout=60) as http:
        for url, known, other in [(a.url, 200, 200), (b.url, 200, 404)]:
            for name, status in [(NAME, known), ("code", known), ("code:latest", known), ("gpt-4", other)]:
                r = http.post(url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
                assert r.status_code == status, (url, name)
                r = http.post(url + "/completion", json={"model": name, "prompt": "x", "n_predict": 1})
                assert r.status_code == status, (url, name)
        r = http.post(b.url + "/api/generate", json={"model": "gpt-4", "prompt": "x", "stream": False})
        assert r.status_code == 404 and "not found" in r.json()["error"] and "'code'" in r.json()["error"]


def test_context_shift_goes_on_past_the_context(tiny):
    service = service_of(tiny)
    with running(service, llamacpp=Settings(context_shift=True)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as http:
        prompt = "".join(FILE[:40])
        n_prompt = len(tiny.tokenizer.encode(prompt, bos=True, eos=False))
        n_predict = MAX_SEQ_LEN - n_prompt + 40
        out = http.post("/completion", json={"prompt": prompt, "n_predict": n_predict, "n_keep": 10}).json()
        assert out["timings"]["predicted_n"] == n_predict and out["truncated"] is True
        assert out["timings"]["prompt_n"] + out["timings"]["cache_n"] == n_prompt
    with running(service_of(tiny)) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        ids = tiny.tokenizer.encode("".join(FILE), bos=True, eos=False)[:MAX_SEQ_LEN - 6]
        out = http.post("/completion", json={"prompt": ids, "n_predict": -1, "temperature": 0}).json()
        assert out["truncated"] is True and out["stop_type"] == "limit"  # without: it stops at the context's end
        assert out["tokens_predicted"] == 6 and out["tokens_evaluated"] == MAX_SEQ_LEN - 6


def test_openai_and_ollama_infilling_of_a_long_file_is_fitted_not_refused(tiny, served, http):
    service, _ = served
    prefix, suffix = "".join(FILE[:400]), "".join(FILE[400:600])
    expected = service.infill(prefix, suffix, reserve=16)
    assert expected.truncated
    text, _ = greedy_text(tiny, expected.ids, 16, expected.stop_ids)
    oai = http.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 16, "temperature": 0})
    assert oai.status_code == 200 and oai.json()["choices"][0]["text"] == text
    ollama = http.post("/api/generate", json={"model": NAME, "prompt": prefix, "suffix": suffix, "stream": False,
                                              "options": {"temperature": 0, "num_predict": 16}})
    assert ollama.status_code == 200 and ollama.json()["response"] == text
