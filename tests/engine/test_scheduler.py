"""The scheduler on its own: no model, no tensors, requests as plain objects."""

from codellama.engine import RequestState, SamplingParams
from codellama.engine.request import Request
from codellama.engine.scheduler import MIN_REUSE, Scheduler

PARAMS = SamplingParams(temperature=0)


def request(rid, prompt, limit=8, params=PARAMS):
    return Request(None, rid, list(prompt), params, limit=limit)


def scheduler(slots=2, max_seq_len=64, budget=16, **kw):
    finished = []
    s = Scheduler(slots, max_seq_len, budget, on_finish=lambda r, reason: finished.append((r.id, reason)), **kw)
    return s, finished


def prefilled(s, *requests):
    """Admit ``requests`` and record their prompts as computed (what a step's prefill forwards do)."""
    for r in requests:
        s.add(r)
    s.schedule()
    for r in requests:
        s.prefilled(r, r.prompt)


def test_admission_fills_free_slots_in_order_and_the_rest_wait():
    s, _ = scheduler(slots=2)
    reqs = [request(i, [1, 2, 3 + i]) for i in range(3)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert [a[0] for a in plan.admitted] == [0, 1] and {a[1] for a in plan.admitted} == {0, 1}
    assert [r.state for r in reqs] == [RequestState.PREFILLING, RequestState.PREFILLING, RequestState.WAITING]
    assert [f.kind for f in plan.forwards] == ["prefill", "prefill"] and all(f.sample for f in plan.forwards)


def test_decode_rows_come_first_and_prefill_takes_what_is_left_of_the_budget():
    s, _ = scheduler(slots=3, budget=10)
    a, b = request(0, [1] * 4), request(1, [2] * 30)
    s.add(a)
    s.schedule()
    s.prefilled(a, a.prompt)
    s.set_pending(a, 7)
    assert a.state is RequestState.DECODING
    s.add(b)
    plan = s.schedule()
    decode, prefill = plan.forwards
    assert decode.kind == "decode" and decode.tokens == [[7]] and decode.starts == [4]
    assert prefill.kind == "prefill" and len(prefill.tokens[0]) == 9 and not prefill.sample  # 10 - 1 decode row
    s.prefilled(b, prefill.tokens[0])
    assert s.schedule().forwards[1].starts == [9]


def test_a_free_slot_holding_the_longest_shared_prefix_is_chosen_and_the_prefix_skipped():
    s, _ = scheduler(slots=2)
    shared = list(range(1, 41))
    first, other = request(0, shared + [99]), request(1, [7] * 30)
    prefilled(s, first, other)
    for r in (first, other):
        s.finish(r, "stop")
    again = request(2, shared + [50, 51])
    s.add(again)
    plan = s.schedule()
    assert plan.admitted == [(2, first.slot, len(shared))] and again.cached_tokens == len(shared)
    assert plan.forwards[0].tokens == [[50, 51]] and plan.forwards[0].starts == [len(shared)]


def test_a_short_match_does_not_choose_the_slot_recency_does():
    s, _ = scheduler(slots=2)
    a, b = request(0, [1, 2, 3] + [10] * 20), request(1, [5] * 20)
    prefilled(s, a, b)
    s.finish(a, "stop")
    s.steps += 5
    s.finish(b, "stop")  # b's slot used later
    c = request(2, [1, 2, 3] + [11] * 20)  # shares 3 < MIN_REUSE tokens with a's slot
    assert 3 < MIN_REUSE
    s.add(c)
    s.schedule()
    assert c.slot == a.slot and c.cached_tokens == 3  # least recently used, still skipping what it shares


def test_cancelled_and_zero_budget_requests_finish_without_a_forward():
    s, finished = scheduler(slots=1)
    waiting, zero = request(0, [1, 2]), request(1, [1, 3], limit=0)
    s.add(waiting)
    s.add(zero)
    waiting.cancel_requested = True
    plan = s.schedule()
    assert plan.retired == [0] and plan.changed and not plan.forwards
    assert finished == [(0, "cancelled"), (1, "length")] and s.free_slots == 1 and not s.busy
    assert waiting.state is zero.state is RequestState.FINISHED


def test_a_request_whose_callback_failed_is_retired_as_an_error():
    s, finished = scheduler(slots=1)
    r = request(0, [1, 2])
    s.add(r)
    r.error, r.cancel_requested = KeyError("x"), True
    s.schedule()
    assert finished == [(0, "error")]


def test_prompt_logprobs_reuse_nothing_and_the_last_prompt_token_is_always_computed():
    s, _ = scheduler(slots=1)
    r = request(0, list(range(1, 30)))
    s.add(r)
    s.schedule()
    s.prefilled(r, r.prompt)
    s.finish(r, "stop")
    same = request(1, list(range(1, 30)))
    s.add(same)
    s.schedule()
    assert same.cached_tokens == 28  # all but the last
    s.finish(same, "stop")
    lp = request(2, list(range(1, 30)), params=SamplingParams(temperature=0, prompt_logprobs=True))
    s.add(lp)
    plan = s.schedule()
    assert lp.cached_tokens == 0 and plan.forwards[0].all_logits


def test_followers_replay_the_leaders_plan():
    leader, _ = scheduler(slots=2)
    follower, _ = scheduler(slots=2)
    for s in (leader, follower):
        for i in range(3):
            s.add(request(i, [1, 2, 3 + i]))
    plan = leader.schedule()
    follower.follow(plan)
    assert [(r.id, r.slot) for r in follower.running.values()] == [(r.id, r.slot) for r in leader.running.values()]
    assert [r.id for r in follower.waiting] == [2]


def test_compiled_decode_carries_every_slots_position():
    s, _ = scheduler(slots=3, all_slot_positions=True)
    r = request(0, [1, 2, 3])
    s.add(r)
    s.schedule()
    s.prefilled(r, r.prompt)
    s.set_pending(r, 9)
    decode = s.schedule().forwards[0]
    assert decode.slot_positions[r.slot] == 3 and sorted(decode.slot_positions) == [0, 0, 3]
