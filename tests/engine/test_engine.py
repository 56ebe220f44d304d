"""The engine: many callers on one model, each getting exactly what it gets alone.

Everything is checked against the same request run alone on a fresh engine (greedy, float32: token for
token; seeded sampling: the same draws), with real threads where concurrency is the point.
"""

import threading

import pytest
import torch

from codellama import Llama
from codellama.engine import Engine, EngineFull, SamplingParams

PROMPTS = ["import os\nimport sys\n", "def fibonacci(n):\n    if n < 2:\n        return n\n", "class Stack:\n",
           "    for line in open(path):\n", "x = [i * i for i in range(10)]\n", "try:\n    import json\n"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=256, max_batch_size=4, device="cpu")


def fresh(tiny, **kw) -> Engine:
    """A new engine (empty cache) on the bundled model."""
    kw = {"max_batch_size": 4, "max_seq_len": 256, **kw}
    return Engine(tiny.model, tiny.tokenizer, **kw)


def encode(tiny, text):
    return tiny.tokenizer.encode(text, bos=True, eos=False)


@pytest.fixture(scope="module")
def solo(tiny):
    """Each prompt's greedy result alone: its tokens and text."""
    out = {}
    for p in PROMPTS:
        r = fresh(tiny).submit(encode(tiny, p), GREEDY).result()
        out[p] = (r.tokens, r.text)
    return out


# ----------------------------------------------------------------------------- concurrency
def test_threads_sharing_one_llama_each_get_their_solo_result(tiny, solo):
    llama = Llama(tiny.model, tiny.tokenizer, max_seq_len=256, max_batch_size=4)
    results, errors = {}, []

    def worker(k):
        try:
            for i in range(4):
                p = PROMPTS[(k + i) % len(PROMPTS)]
                tokens = llama.generate([encode(tiny, p)], 24, temperature=0, stop_token=[])[0][0]
                results[(k, i)] = (p, tokens)
        except Exception as e:  # surfaced below: a failure in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 16
    for p, tokens in results.values():
        assert tokens == solo[p][0]
    assert llama.engine.scheduler.steps < 16 * 24  # requests really shared steps


def test_seeded_sampling_draws_the_same_whatever_shares_the_batch(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234)
    alone = fresh(tiny).submit(encode(tiny, PROMPTS[0]), params).result().tokens
    engine = fresh(tiny)
    others = [engine.submit(encode(tiny, p), SamplingParams(temperature=0.8, max_tokens=30, seed=i))
              for i, p in enumerate(PROMPTS[1:4])]
    mine = engine.submit(encode(tiny, PROMPTS[0]), params)
    assert mine.result().tokens == alone
    assert all(o.result().finish_reason in ("length", "stop") for o in others)


def test_rows_of_one_batch_use_their_own_parameters(tiny, solo):
    engine = fresh(tiny)
    greedy = engine.submit(encode(tiny, PROMPTS[1]), GREEDY)
    short = engine.submit(encode(tiny, PROMPTS[2]), SamplingParams(temperature=0, max_tokens=3))
    hot = engine.submit(encode(tiny, PROMPTS[3]), SamplingParams(temperature=1.5, top_k=5, max_tokens=10, seed=7,
                                                                 logprobs=True))
    assert greedy.result().tokens == solo[PROMPTS[1]][0]
    assert short.result().tokens == solo[PROMPTS[2]][0][:3] and short.finish_reason == "length"
    assert len(hot.result().logprobs) == len(hot.tokens) and all(lp <= 0 for lp in hot.logprobs)


def test_two_streams_consumed_alternately_are_both_right(tiny, solo):
    a, b = (tiny.stream_completion(p, temperature=0, max_gen_len=24) for p in PROMPTS[:2])
    pieces = {0: [], 1: []}
    streams = {0: a, 1: b}
    while streams:
        for k in list(streams):
            try:
                pieces[k].append(next(streams[k]))
            except StopIteration:
                del streams[k]
    for k in (0, 1):
        assert "".join(pieces[k]) == tiny.tokenizer.decode(_until_eos(tiny, solo[PROMPTS[k]][0]))


def _until_eos(tiny, tokens):
    eos = tiny.tokenizer.eos_id
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def test_an_abandoned_stream_resumed_later_continues_its_own_text(tiny, solo):
    stream = tiny.stream_completion(PROMPTS[0], temperature=0, max_gen_len=24)
    first = [next(stream), next(stream)]
    other = tiny.text_completion([PROMPTS[1]], temperature=0, max_gen_len=24)[0]["generation"]
    assert other == tiny.tokenizer.decode(_until_eos(tiny, solo[PROMPTS[1]][0]))
    assert "".join(first + list(stream)) == tiny.tokenizer.decode(_until_eos(tiny, solo[PROMPTS[0]][0]))


def test_closing_a_stream_or_cancelling_frees_the_slot(tiny):
    engine = fresh(tiny)
    r = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=0, max_tokens=200))
    events = iter(r)
    next(events)
    assert len(engine.scheduler.running) == 1
    events.close()
    engine.step()
    assert r.finish_reason == "cancelled" and not engine.scheduler.running
    r2 = engine.submit(encode(tiny, PROMPTS[1]), SamplingParams(temperature=0, max_tokens=200))
    r2.cancel()
    assert r2.result().finish_reason == "cancelled" and r2.tokens == []
    assert all(s.owner is None for s in engine.scheduler.slots)


def test_a_suspended_stream_leaves_the_callers_grad_mode_alone(tiny):
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    stream = tiny.stream_completion(PROMPTS[0], temperature=0, max_gen_len=8)
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()  # autograd still works between next() calls
    assert x.grad is not None
    stream.close()


# ----------------------------------------------------------------------------- scheduling
def test_joins_and_leaves_at_every_step(tiny, solo):
    """Requests arriving at different steps with different lengths, on 2 slots: each gets its solo result."""
    engine = fresh(tiny, max_batch_size=2)
    lengths = [5, 24, 9, 17, 24, 3]
    requests, arrivals = [], iter(range(len(PROMPTS)))
    for step in range(400):
        if step % 3 == 0:
            i = next(arrivals, None)
            if i is not None:
                requests.append((i, engine.submit(encode(tiny, PROMPTS[i]), SamplingParams(temperature=0,
                                                                                              max_tokens=lengths[i]))))
        engine.step()
        if len(requests) == len(PROMPTS) and all(r.done for _, r in requests):
            break
    for i, r in requests:
        assert r.tokens == solo[PROMPTS[i]][0][:lengths[i]], i


def test_prefix_reuse_gives_the_cold_result_and_computes_only_the_rest(tiny, monkeypatch):
    base = encode(tiny, "def parse(text):\n    result = []\n    for line in text.splitlines():\n")
    edited = base + tiny.tokenizer.encode("        if line:", bos=False, eos=False)
    cold = fresh(tiny).submit(edited, GREEDY).result().tokens
    engine = fresh(tiny)
    engine.submit(base, GREEDY).result()
    fed = []
    forward = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda t, s=0, **kw: fed.append(t.shape) or forward(t, s, **kw))
    warm = engine.submit(edited, GREEDY).result()
    assert warm.tokens == cold
    assert warm.cached_tokens == len(base)  # the whole shared prefix came from the slot
    assert fed[0] == (1, len(edited) - len(base))  # only the new tokens were prefilled


def test_the_slot_with_the_longest_match_is_chosen_and_lru_is_evicted(tiny):
    engine = fresh(tiny, max_batch_size=2)
    a, b = encode(tiny, PROMPTS[0]), encode(tiny, PROMPTS[1])
    engine.submit(a, SamplingParams(temperature=0, max_tokens=2)).result()
    engine.submit(b, SamplingParams(temperature=0, max_tokens=2)).result()
    slot_a, slot_b = (next(i for i, s in enumerate(engine.scheduler.slots) if s.cached[:len(p) - 1] == p[:-1]) for p in (a, b))
    assert slot_a != slot_b
    again = engine.submit(a + [42], SamplingParams(temperature=0, max_tokens=1))
    again.result()
    assert again.slot == slot_a and again.cached_tokens == len(a)
    c = engine.submit(encode(tiny, PROMPTS[2]), SamplingParams(temperature=0, max_tokens=1)).result()
    assert c.slot == slot_b  # no match anywhere: the least recently used slot gives up its cache


def test_chunked_prefill_interleaves_with_decoding(tiny, solo):
    """A long prompt arriving while another request streams: the streaming request gets a token every step."""
    engine = fresh(tiny, max_tokens_per_step=16)
    streaming = engine.submit(encode(tiny, PROMPTS[1]), GREEDY)
    while len(streaming.tokens) < 2:
        engine.step()
    long_prompt = encode(tiny, "import os\n" * 40)  # > 100 tokens: several chunks of at most 15
    late = engine.submit(long_prompt, SamplingParams(temperature=0, max_tokens=4))
    before = len(streaming.tokens)
    steps = 0
    while late.pending is None and not late.done:
        engine.step()
        steps += 1
        assert len(streaming.tokens) == min(before + steps, 24) or streaming.done
    assert steps >= len(long_prompt) // 16
    assert streaming.result().tokens == solo[PROMPTS[1]][0]
    assert late.result().tokens == fresh(tiny).submit(long_prompt, SamplingParams(temperature=0, max_tokens=4)
                                                      ).result().tokens


# ----------------------------------------------------------------------------- stopping
def test_stop_strings_split_across_tokens(tiny, solo):
    from codellama.tokenizer import TextStream
    tokens, text = solo[PROMPTS[1]]
    stream = TextStream(tiny.tokenizer)
    pieces = [stream.push(t) for t in tokens]
    # a stop string made of the end of one token's text and the start of the next one's
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    assert stop in text
    r = fresh(tiny).submit(encode(tiny, PROMPTS[1]), SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    events = list(r)
    assert r.finish_reason == "stop" and r.text == text[:text.index(stop)]
    assert "".join(e.text for e in events) == r.text  # nothing shown that was cut afterwards
    assert events[-1].finish_reason == "stop"


def test_stop_token_ids_and_limits(tiny, solo):
    tokens = solo[PROMPTS[0]][0]
    r = fresh(tiny).submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=0, max_tokens=24,
                                                                    stop_token_ids=(tokens[5],))).result()
    assert r.tokens == tokens[:tokens.index(tokens[5])] and r.finish_reason == "stop"
    prompt = encode(tiny, PROMPTS[0])
    near_full = fresh(tiny, max_seq_len=len(prompt) + 3).submit(prompt, GREEDY).result()
    assert len(near_full.tokens) == 3 and near_full.finish_reason == "length"  # the context is full


def test_bad_requests_are_refused_clearly(tiny):
    engine = fresh(tiny, max_seq_len=32, max_batch_size=1, max_waiting=1)
    with pytest.raises(ValueError, match="more than max_seq_len=32"):
        engine.submit(list(range(1, 40)), GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 99999], GREEDY)
    with pytest.raises(ValueError, match="a prompt must be a list"):
        engine.submit("text", GREEDY)
    for bad, match in ((dict(temperature=float("inf")), "finite"), (dict(max_tokens=-1), "max_tokens"),
                       (dict(stop=[""]), "non-empty"), (dict(seed=1.5), "seed"), (dict(logprobs=1), "logprobs")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    for bad, match in ((dict(logprobs=True, top_logprobs=21), "0 to 20"), (dict(logprobs=True, top_logprobs=True),
                        "top_logprobs must be an integer"), (dict(top_logprobs=3), "needs logprobs=True")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    engine.submit([1, 2], GREEDY)  # takes the free slot at the next step
    engine.submit([1, 2], GREEDY)  # waits for it
    with pytest.raises(EngineFull, match="max_waiting=1"):
        engine.submit([1, 3], GREEDY)


# ----------------------------------------------------------------------------- log-probabilities
def test_top_logprobs_are_the_model_s_likeliest_tokens(tiny):
    k, prompt = 5, encode(tiny, PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=True, prompt_logprobs=True, top_logprobs=k)
    r = fresh(tiny).submit(prompt, params)
    events = [e for e in r if e.token is not None]
    ids = prompt + r.tokens
    # The reference: one forward of the whole sequence through the model (no engine, no cache reuse).
    with torch.inference_mode():
        ref = torch.log_softmax(tiny.model(torch.tensor([ids]), 0).float(), dim=-1)[0]  # (len, V)
    assert len(r.top_logprobs) == len(r.tokens) == len(events)
    for i, (token, lp, top) in enumerate(zip(r.tokens, r.logprobs, r.top_logprobs)):
        row = ref[len(prompt) - 1 + i]
        values, best = row.topk(k)
        assert [t for t, _ in top] == best.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert top[0] == (token, pytest.approx(lp, abs=1e-6))  # greedy: the chosen token is the likeliest
        assert events[i].top_logprobs == top
    assert r.prompt_top_logprobs[0] is None and len(r.prompt_top_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert [t for t, _ in r.prompt_top_logprobs[pos]] == ref[pos - 1].topk(k).indices.tolist()
    plain = fresh(tiny).submit(prompt, SamplingParams(temperature=0, max_tokens=12, logprobs=True)).result()
    assert plain.tokens == r.tokens and plain.top_logprobs == [] and plain.prompt_top_logprobs is None


# ----------------------------------------------------------------------------- memory, threads, compile
def test_the_cache_is_allocated_once_at_the_stated_size(tiny):
    engine = fresh(tiny)
    a = tiny.model.args
    assert engine.cache_bytes == 4 * 256 * 2 * a.n_layers * a.kv_heads * a.head_dim * 4  # fp32
    engine.submit(encode(tiny, PROMPTS[0]), GREEDY).result()
    cache = engine.cache
    assert cache.k.numel() * cache.k.element_size() * 2 == engine.cache_bytes
    engine.submit(encode(tiny, PROMPTS[1]), GREEDY).result()
    assert engine.cache is cache


def test_a_cache_that_cannot_fit_is_refused_with_its_size(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch_size=10**5, max_seq_len=10**6)
    r = engine.submit(encode(tiny, PROMPTS[0]), GREEDY)
    with pytest.raises(ValueError, match=r"the KV cache needs .* GiB \(100000 slots × 1000000 positions"):
        r.result()
    assert r.finish_reason == "error"


def test_a_background_thread_that_fails_fails_its_requests_instead_of_hanging(tiny, monkeypatch):
    engine = fresh(tiny)

    def broken_plan():
        raise RuntimeError("a collective timed out (test)")

    monkeypatch.setattr(engine.scheduler, "schedule", broken_plan)
    engine.start()
    r = engine.submit(encode(tiny, PROMPTS[0]), GREEDY)
    with pytest.raises(RuntimeError, match="generation failed: RuntimeError: a collective timed out"):
        r.result()
    assert r.finish_reason == "error" and not any(t.name == "codellama-engine" for t in threading.enumerate())


def test_background_thread_serves_and_stops_cleanly(tiny, solo):
    engine = fresh(tiny).start()
    try:
        requests = [engine.submit(encode(tiny, p), GREEDY) for p in PROMPTS[:3]]
        assert [r.result().tokens for r in requests] == [solo[p][0] for p in PROMPTS[:3]]
        endless = engine.submit(encode(tiny, PROMPTS[3]), SamplingParams(temperature=0.8, max_tokens=200, seed=1))
        events = iter(endless)
        next(events)
    finally:
        engine.stop()
    rest = list(events)
    assert endless.finish_reason == "cancelled" and rest[-1].finish_reason == "cancelled"
    assert not any(t.name == "codellama-engine" for t in threading.enumerate())


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(tiny, solo):
    engine = fresh(tiny, compile=True, max_batch_size=2)
    requests = [engine.submit(encode(tiny, p), GREEDY) for p in PROMPTS[:3]]
    assert [r.result().tokens for r in requests] == [solo[p][0] for p in PROMPTS[:3]]
