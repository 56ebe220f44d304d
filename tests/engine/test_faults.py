"""One request's fault is its own: bad numbers, failing forwards, failing callbacks and costly stop strings end
that request alone; nobody waits forever; the loader and the model refuse bad input with a clear error."""

import threading
import time

import pytest
import torch

from codellama import Llama, ModelArgs, load_model
from codellama.engine import Engine, EngineFull, SamplingParams
from codellama.engine.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS, Detokenizer, StopMatcher
from codellama.sampling import is_greedy, sample
from codellama.formats.meta import save_meta
from codellama.testing import random_state_dict
from codellama.tokenizer import TextStream

PROMPTS = ["import os\nimport sys\n", "def fibonacci(n):\n    if n < 2:\n        return n\n", "class Stack:\n",
           "x = [i * i for i in range(10)]\n"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=256, max_batch_size=4, device="cpu")


def fresh(tiny, **kw) -> Engine:
    return Engine(tiny.model, tiny.tokenizer, **{"max_batch_size": 4, "max_seq_len": 256, **kw})


def encode(tiny, text):
    return tiny.tokenizer.encode(text, bos=True, eos=False)


@pytest.fixture(scope="module")
def solo(tiny):
    return {p: fresh(tiny).submit(encode(tiny, p), GREEDY).result().tokens for p in PROMPTS}


class Faulty:
    """The model, except that a forward over ``victim``'s slot misbehaves while the victim runs: ``"nan"``
    logits for its row, or ``"raise"``."""

    def __init__(self, model, victim, mode: str):
        self.model, self.victim, self.mode = model, victim, mode

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, starts, *, slots, **kw):
        hit = not self.victim.done and self.victim.slot in slots
        if hit and self.mode == "raise":
            raise RuntimeError(f"a fault in slot {self.victim.slot} (test)")
        out = self.model(tokens, starts, slots=slots, **kw)
        if hit and self.mode == "nan":
            out[slots.index(self.victim.slot)] = float("nan")
        return out


def victim_and_others(tiny, engine, mode: str):
    """Start a victim request, make its slot faulty, then run it with the others; returns (victim, others)."""
    victim = engine.submit(encode(tiny, "def victim():\n"), SamplingParams(temperature=0, max_tokens=16))
    engine.step()  # admitted and prefilled: it owns a slot now
    engine.runner.model = Faulty(engine.runner.model, victim, mode)
    others = [engine.submit(encode(tiny, p), GREEDY) for p in PROMPTS[:3]]
    return victim, others


# ----------------------------------------------------------------------------- numbers
def test_a_temperature_too_small_for_float32_is_greedy(tiny, solo):
    assert is_greedy(0) and is_greedy(1e-46) and not is_greedy(1e-30)
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, 1e-46, 0.9), logits.argmax(-1))
    engine = fresh(tiny)
    tiny_t = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=1e-46, max_tokens=16))
    others = [engine.submit(encode(tiny, p), GREEDY) for p in PROMPTS[1:]]
    assert tiny_t.result().tokens == solo[PROMPTS[0]] and tiny_t.finish_reason == "length"
    assert [r.result().tokens for r in others] == [solo[p] for p in PROMPTS[1:]]


def test_nan_logits_fail_their_row_alone(tiny, solo):
    engine = fresh(tiny)
    victim, others = victim_and_others(tiny, engine, "nan")
    assert [r.result().tokens for r in others] == [solo[p] for p in PROMPTS[:3]]
    with pytest.raises(RuntimeError, match="FloatingPointError: the model's logits at position .* are not finite"):
        victim.result()
    assert victim.finish_reason == "error" and not engine.scheduler.slots[victim.slot].cached


# ----------------------------------------------------------------------------- failing forwards
def test_a_failing_forward_fails_its_own_request_not_the_caller_driving_the_step(tiny, solo):
    engine = fresh(tiny)
    victim, others = victim_and_others(tiny, engine, "raise")
    # This thread drives the steps for the others; the victim's fault must not be raised here.
    assert [r.result().tokens for r in others] == [solo[p] for p in PROMPTS[:3]]
    with pytest.raises(RuntimeError, match="generation failed: RuntimeError: a fault in slot"):
        victim.result()
    assert victim.finish_reason == "error"


def test_a_waiting_request_never_gets_another_requests_error(tiny, solo):
    engine = fresh(tiny, max_batch_size=2)
    victim, _ = victim_and_others(tiny, engine, "raise")
    waiting = engine.submit(encode(tiny, PROMPTS[3]), GREEDY)  # queued behind the two slots
    results, errors = {}, []

    def wait(name, request):
        try:
            results[name] = request.result().tokens
        except Exception as e:  # noqa: BLE001 - recorded for the assertion below
            errors.append((name, e))

    threads = [threading.Thread(target=wait, args=(n, r)) for n, r in (("victim", victim), ("waiting", waiting))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert [name for name, _ in errors] == ["victim"]
    assert results["waiting"] == solo[PROMPTS[3]]


# ----------------------------------------------------------------------------- callbacks
def test_a_raising_callback_fails_its_own_request_on_a_started_engine(tiny, solo):
    engine = fresh(tiny).start()
    try:
        seen = []

        def bad(event):
            seen.append(event)
            if len(seen) == 3:
                raise KeyError("the caller's bug (test)")

        broken = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=0, max_tokens=40), on_event=bad)
        fine = [engine.submit(encode(tiny, p), GREEDY) for p in PROMPTS[1:]]
        with pytest.raises(RuntimeError, match="KeyError"):
            broken.result()
        assert broken.finish_reason == "error" and len(broken.tokens) < 40
        assert [r.result().tokens for r in fine] == [solo[p] for p in PROMPTS[1:]]

        def raise_on_cancel(event):
            if event.finish_reason == "cancelled":
                raise RuntimeError("raised on the cancelled event (test)")

        endless = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=0.8, max_tokens=200, seed=1),
                                on_event=raise_on_cancel)
        endless.cancel()
        assert endless.result().finish_reason == "cancelled"
        # The engine thread is alive: a later request is served.
        assert engine.submit(encode(tiny, PROMPTS[1]), GREEDY).result().tokens == solo[PROMPTS[1]]
    finally:
        engine.stop()


# ----------------------------------------------------------------------------- wake-ups
def finishes_within(fn, seconds: float = 30.0):
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s (a lost wake-up)"
    return box[0]


def test_requests_that_never_run_a_forward_still_wake_their_waiter(tiny):
    engine = fresh(tiny).start()
    try:
        zero = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=0, max_tokens=0))
        assert finishes_within(zero.result).finish_reason == "length" and zero.tokens == []
        busy = fresh(tiny, max_batch_size=1).start()
        try:
            blocker = busy.submit(encode(tiny, PROMPTS[0]), SamplingParams(temperature=0.8, max_tokens=200, seed=2))
            queued = busy.submit(encode(tiny, PROMPTS[1]), GREEDY)
            queued.cancel()
            assert finishes_within(queued.result).finish_reason == "cancelled"
            blocker.cancel()
        finally:
            busy.stop()
    finally:
        engine.stop()
    llama = Llama(tiny.model, tiny.tokenizer, max_seq_len=256, max_batch_size=2)
    llama.engine.start()
    try:
        out = finishes_within(lambda: llama.text_completion(["import os\n"], max_gen_len=0))
        assert out == [{"generation": ""}]
    finally:
        llama.engine.stop()


# ----------------------------------------------------------------------------- the queue bound
def test_max_waiting_counts_only_requests_no_free_slot_awaits(tiny):
    engine = fresh(tiny, max_batch_size=2, max_waiting=0)
    first, second = (engine.submit(encode(tiny, p), GREEDY) for p in PROMPTS[:2])  # two free slots: accepted
    with pytest.raises(EngineFull, match=r"all 2 slots are taken .*max_waiting=0"):
        engine.submit(encode(tiny, PROMPTS[2]), GREEDY)
    assert first.result().finish_reason == second.result().finish_reason == "length"
    assert engine.submit(encode(tiny, PROMPTS[2]), GREEDY).result().tokens  # the slots are free again


# ----------------------------------------------------------------------------- stop strings
def test_stop_strings_are_bounded_with_a_clear_error():
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRINGS} are allowed"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match=f"a stop string of {MAX_STOP_CHARS + 1} characters .* at most {MAX_STOP_CHARS}"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])
    assert len(SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS).stop) == MAX_STOP_STRINGS


def reference_cut(text: str, stops) -> int:
    """Where a stop string first begins in ``text`` (len(text) if none): the whole text at once."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else len(text)


def test_the_stop_automaton_holds_back_and_cuts_as_a_search_of_the_whole_text_does():
    from hypothesis import given, settings, strategies as st
    alphabet = st.sampled_from("ab\nc ")

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1, max_size=4),
           st.lists(st.text(alphabet, max_size=4), max_size=12))
    def check(stops, pieces):
        matcher = StopMatcher(stops)
        text, shown, cut = "", "", None
        for piece in pieces:
            for ch in piece:
                text += ch
                n = matcher.feed(ch)
                if n and cut is None:
                    cut = len(text) - n
            if cut is not None:
                break
            # Held back: the longest end of the text that begins a stop string.
            want = max([n for s in stops for n in range(1, min(len(s), len(text)) + 1)
                        if text.endswith(s[:n]) and n < len(s)] or [0])
            assert matcher.partial == want
        if cut is not None:
            assert reference_cut(text, stops) <= cut  # found no later than the first stop to complete
    check()


class Chars:
    """A stand-in tokenizer whose token i decodes to ``chr(i)``: text arrives a character at a time."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_stop_matching_costs_the_same_per_token_whatever_the_list():
    stops = ["a" * (MAX_STOP_CHARS - 1) + chr(ord("b") + i) for i in range(MAX_STOP_STRINGS)]  # never complete
    timings = {}
    for name, lists in (("one short stop", ["zz"]), ("the longest lists allowed", stops)):
        detok = Detokenizer(TextStream(Chars()), lists)
        start = time.perf_counter()
        for _ in range(3000):
            detok.push(ord("a"))
        timings[name] = time.perf_counter() - start
    # A search of the whole text per token took minutes here; the automaton is linear in the text.
    assert timings["the longest lists allowed"] < 10 * timings["one short stop"] + 0.5, timings


def test_pieces_still_join_to_the_text_cut_at_the_first_stop(tiny):
    engine = fresh(tiny)
    free = engine.submit(encode(tiny, PROMPTS[1]), SamplingParams(temperature=0, max_tokens=40)).result()
    stop = free.text[10:13]
    cut = engine.submit(encode(tiny, PROMPTS[1]), SamplingParams(temperature=0, max_tokens=40,
                                                                 stop=[stop, "§never"]))
    pieces = "".join(e.text for e in cut)
    assert pieces == cut.text == free.text[:free.text.index(stop)] and cut.finish_reason == "stop"


# ----------------------------------------------------------------------------- loading and the model
ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)


def test_the_loader_refuses_integer_embeddings_and_non_finite_weights(tmp_path):
    torch.manual_seed(0)
    for name, change, match in (
            ("int64", lambda sd: sd.__setitem__("tok_embeddings.weight", sd["tok_embeddings.weight"].long()),
             r"tok_embeddings.weight has dtype torch.int64 .* expects floating-point weights"),
            ("nan", lambda sd: sd["layers.0.attention.wq.weight"].view(-1)[5:8].fill_(float("nan")),
             r"layers.0.attention.wq.weight holds 3 value\(s\) that are NaN or infinite")):
        state = random_state_dict(ARGS)
        change(state)
        save_meta(state, ARGS, tmp_path / name)
        with pytest.raises(ValueError, match=match):
            load_model(tmp_path / name, device="cpu")


def test_the_model_refuses_impossible_caches_and_chunks():
    model = load_model(device="cpu")  # the bundled model
    with pytest.raises(ValueError, match=r"the KV cache needs .* GiB \(1 slots × 1000000000000 positions"):
        model.setup_cache(1, 10**12)
    model.setup_cache(1, 64)
    prompt = torch.tensor([[1, 2, 3, 4]])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            model.prefill(prompt, chunk_size=bad)
    assert model.prefill(prompt, chunk_size=3).shape == (1, model.args.vocab_size)
