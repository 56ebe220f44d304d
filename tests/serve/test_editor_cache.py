"""The server for editors: llama.cpp's ``id_slot`` supersedes the request in flight, ``tokens_cached`` and
``timings.prompt_n`` count what the caches saved, the SPM layout, and the flags."""

import threading

import httpx
import pytest

from codellama.engine.scheduler import common_prefix
from codellama.cli.serve import parser
from test_serve import MAX_SEQ_LEN, captured_requests, make_service, running, tiny, wait_until  # noqa: F401

PREFIX = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(6))
SUFFIX = "\n\nif __name__ == '__main__':\n    f0(1)\n"


def test_a_newer_request_for_the_same_slot_supersedes_the_one_in_flight(tiny, monkeypatch):
    service = make_service(tiny, max_batch_size=2)
    seen = captured_requests(service, monkeypatch)
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "def g", "temperature": 0, "id_slot": 0}
    with running(service) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        answers = {}
        first = threading.Thread(target=lambda: answers.setdefault(
            "first", http.post("/infill", json={**body, "n_predict": MAX_SEQ_LEN})))
        first.start()
        wait_until(lambda: seen and seen[0].tokens)  # decoding
        warm = http.post("/infill", json={**body, "prompt": "", "n_predict": 0})  # a warm-up stops nobody
        assert warm.status_code == 200 and not seen[0].done
        assert warm.json()["content"] == "" and warm.json()["tokens_predicted"] == 0
        assert len(seen[1].prompt) - seen[1].cached_tokens > 0  # it computed its prompt (into the cache)
        other = threading.Thread(target=lambda: answers.setdefault(
            "other", http.post("/infill", json={**body, "id_slot": 1, "n_predict": 64})))
        other.start()
        # decoding in the other slot: were it still waiting when the first is superseded, it would take the
        # first's slot (the longer shared prefix: its prompt is the first's) and leave the newer one the warm-up's
        wait_until(lambda: len(seen) == 3 and seen[2].tokens)
        newer = http.post("/infill", json={**body, "prompt": "def gg", "n_predict": 4})
        first.join(60)
        other.join(60)
    assert newer.status_code == 200 and newer.json()["tokens_predicted"] <= 4
    assert answers["first"].status_code == 409 and "superseded" in answers["first"].json()["error"]["message"]
    assert seen[0].superseded and seen[0].finish_reason == "cancelled" and len(seen[0].tokens) < MAX_SEQ_LEN - 100
    assert answers["other"].status_code == 200 and not seen[2].superseded  # another slot, another session
    shared = common_prefix(seen[0].prompt, seen[3].prompt)
    assert newer.json()["tokens_cached"] == shared > len(seen[0].prompt) // 2  # what the superseded one computed


@pytest.mark.parametrize("reuse", [0, 16])
def test_tokens_cached_and_prompt_n_count_what_was_not_computed(tiny, reuse):
    service = make_service(tiny, max_batch_size=1, cache_reuse=reuse)
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "def g", "temperature": 0, "n_predict": 2}
    with running(service) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        cold = http.post("/infill", json=body).json()
        assert cold["tokens_cached"] == 0 and cold["timings"]["prompt_n"] == cold["tokens_evaluated"]
        typed = http.post("/infill", json={**body, "prompt": "def gx"}).json()  # one keystroke
        moved = http.post("/infill", json={**body, "input_prefix": "import os\n" + PREFIX}).json()  # a line above
    for answer in (typed, moved):
        assert answer["timings"]["prompt_n"] == answer["tokens_evaluated"] - answer["tokens_cached"]
    if reuse:  # the suffix after the keystroke, and the text below the new line, moved instead of computed
        assert typed["timings"]["prompt_n"] < 8 and moved["timings"]["prompt_n"] < 12
    else:  # only the shared start
        assert typed["timings"]["prompt_n"] > len(SUFFIX) // 4 and moved["timings"]["prompt_n"] > len(PREFIX) // 4


def test_openai_cached_tokens_count_moved_runs_too(tiny, monkeypatch):
    service = make_service(tiny, max_batch_size=1, cache_reuse=16)
    seen = captured_requests(service, monkeypatch)
    body = {"model": "codellama-tiny", "prompt": PREFIX + "def g", "suffix": SUFFIX, "max_tokens": 2, "temperature": 0}
    with running(service) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        http.post("/v1/completions", json=body)
        usage = http.post("/v1/completions", json={**body, "prompt": PREFIX + "def gx"}).json()["usage"]
    shared = common_prefix(seen[0].prompt, seen[1].prompt)
    assert usage["prompt_tokens_details"]["cached_tokens"] == seen[1].cached_tokens
    assert seen[1].cached_tokens == shared + seen[1].shifted_tokens and seen[1].shifted_tokens > 0


def test_spm_infill_lays_prompts_out_suffix_first(tiny):
    service = make_service(tiny)
    service.spm_infill = True
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "temperature": 0, "n_predict": 12}
    want = tiny.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=12, suffix_first=True)[0]["generation"]
    with running(service) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.post("/infill", json=body).json()["content"] == want
        # Text that spells the order keeps it.
        psm = tiny.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=12)[0]["generation"]
        spelled = {"prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>", "temperature": 0, "n_predict": 12}
        assert http.post("/completion", json=spelled).json()["content"] == psm


def test_the_cache_flags():
    args = parser().parse_args(["--cache-ram-mb", "512", "--cache-reuse", "256", "--spm-infill"])
    assert (args.cache_ram_mb, args.cache_reuse, args.spm_infill) == (512, 256, True)
    args = parser().parse_args(["--cache_ram_mb", "0", "--cache_reuse", "0"])
    assert (args.cache_ram_mb, args.cache_reuse, args.spm_infill) == (0, 0, False)
