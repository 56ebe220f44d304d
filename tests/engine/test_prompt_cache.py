"""The prompt cache (host memory beyond the slots), chunk reuse (runs moved to new positions, keys re-rotated),
sessions that supersede their earlier requests, and what ``cached_tokens`` counts.

Exact modes are checked against cold runs (greedy, float32: token for token); the re-rotation against RoPE
computed in float64; the tree's budget and eviction on the pure-Python structure itself.
"""

import pytest
import torch

from codellama import Llama
from codellama.engine import Engine, SamplingParams
from codellama.engine.prompt_cache import (FreeBlocks, PromptCache, RestoreBlocks, SaveBlocks, ShiftRuns,
                                           cache_budget, match_runs)
from codellama.engine.request import Request
from codellama.engine.scheduler import Scheduler
from codellama.model import KVCache, rope_inv_freq, rope_shift_angles
from helpers import CONFIGS, random_model

GREEDY = SamplingParams(temperature=0, max_tokens=8)
B = 16  # the tree's block size in these tests


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=512, max_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def texts(tiny):
    """Four prompts of real code (this package's scheduler), 150-230 tokens, different from their start."""
    import codellama.engine.scheduler as source
    text = open(source.__file__, encoding="utf-8").read()
    ids = [tiny.tokenizer.encode(text[i:i + 1200], bos=True, eos=False) for i in (0, 2000, 4000, 6000)]
    return [p[:150 + 25 * k] for k, p in enumerate(ids)]


def engine(tiny, **kw) -> Engine:
    return Engine(tiny.model, tiny.tokenizer, **{"max_batch_size": 1, "max_seq_len": 512, **kw})


_cold = {}


def cold(tiny, prompt):
    """The greedy tokens of ``prompt`` on a fresh engine without a prompt cache (memoized)."""
    key = tuple(prompt)
    if key not in _cold:
        _cold[key] = engine(tiny, cache_ram_mb=0).submit(prompt, GREEDY).result().tokens
    return _cold[key]


# ----------------------------------------------------------------------------- the tree, on its own
def test_prompts_that_start_alike_share_blocks_and_only_new_blocks_are_copied():
    cache = PromptCache(budget_bytes=100 * B * 10, bytes_per_token=10, block_size=B)
    a = list(range(70))  # 4 full blocks and 6 tokens
    ops = cache.save(0, a)
    assert ops == [SaveBlocks(0, [(0, 0), (1, 16), (2, 32), (3, 48)])]
    b = a[:40] + [999] * 30  # shares two full blocks with a
    ops = cache.save(1, b)
    assert [op.blocks for op in ops] == [[(4, 32), (5, 48)]] and len(cache.blocks) == 6
    assert cache.save(1, b) == []  # nothing new
    assert len(cache.match(a)) == 4 and len(cache.match(b)) == 4 and len(cache.match(a[:31])) == 1
    assert len(cache.match(a, limit=47)) == 2  # whole blocks inside the limit only
    assert cache.match([5] + a[1:]) == []


def test_the_budget_evicts_least_recently_used_leaves_and_never_the_blocks_in_use():
    cache = PromptCache(budget_bytes=6 * B * 10, bytes_per_token=10, block_size=B)  # 6 blocks
    assert cache.capacity == 6
    a, b, c = [1] * 48, [1] * 16 + [2] * 32, [3] * 48
    cache.save(0, a)  # blocks 0, 1, 2
    cache.save(0, b)  # shares block 0 with a: 3, 4
    cache.touch(cache.match(a))  # a is used again: b's blocks are now the oldest leaves
    ops = cache.save(0, c)  # needs 3, one is free: evicts b's last block (4), then b's first (3)
    assert ops[0] == FreeBlocks([4, 3]) and len(cache.blocks) == 6 and cache.used_bytes <= 6 * B * 10
    assert len(cache.match(a)) == 3 and cache.match(b) == cache.match(a)[:1] and len(cache.match(c)) == 3
    # Protected blocks (being restored in this step) stay even when nothing else can go.
    d = [4] * 96
    ops = cache.save(0, d, protect=cache.match(a) + cache.match(c))
    assert not any(isinstance(op, FreeBlocks) for op in ops) and not any(isinstance(op, SaveBlocks) for op in ops)
    assert len(cache.match(a)) == 3 and len(cache.match(c)) == 3
    # A freed id is reused, so the runner's rows stay within the capacity.
    cache.touch(cache.match(c))
    ops = cache.save(0, d[:32])
    assert {i for op in ops if isinstance(op, SaveBlocks) for i, _ in op.blocks} <= set(range(6))


def test_options_are_checked():
    assert cache_budget(None) == 2048 * 2**20 and cache_budget(0) == 0 and cache_budget(1.5) == int(1.5 * 2**20)
    for bad in (-1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="cache_ram_mb"):
            cache_budget(bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cache_reuse"):
            cache_budget(None, bad)


# ----------------------------------------------------------------------------- chunk reuse: which runs
def test_runs_are_found_after_deletions_insertions_and_reorderings():
    old = list(range(100))
    assert match_runs(old, old[:10] + old[20:], 10, 8) == [(20, 10, 79)]  # deleted: the rest moves left
    new = old[:10] + [500, 501, 502] + old[10:]
    assert match_runs(old, new, 10, 8) == [(10, 13, 89)]  # inserted: it moves right (last token computed)
    new = old[:5] + old[50:70] + [7] * 3 + old[20:40] + [9]
    assert match_runs(old, new, 5, 8) == [(50, 5, 20), (20, 28, 20)]  # any order, new text between
    assert match_runs(old, new, 5, 21) == []  # runs shorter than min_run are computed
    assert match_runs(old, old[:30] + [1000], 30, 1) == []  # nothing after the start but the last token
    assert match_runs(old, old[:50] + old[40:60], 50, 8) == [(50, 60, 9)]  # sources from the start on only


# ----------------------------------------------------------------------------- exact: restore from host memory
def test_a_prompt_evicted_from_every_slot_is_restored_and_gives_the_cold_output(tiny, texts):
    e = engine(tiny)  # one slot: every new prompt overwrites the last
    a, b, c, d = texts
    for p in (a, b, c):
        r = e.submit(p, GREEDY).result()
        assert r.tokens == cold(tiny, p) and r.restored_tokens == 0
    again = e.submit(a + b[1:40], GREEDY).result()  # a's start is only in host memory now
    full_blocks = len(a) // B * B
    assert again.restored_tokens == full_blocks - 1 and again.cached_tokens == full_blocks  # BOS was in the slot
    assert again.tokens == cold(tiny, a + b[1:40])
    assert e.scheduler.slots[0].cached[:len(again.prompt)] == again.prompt  # the slot knows what it holds now
    then = e.submit(b[:100], GREEDY).result()  # b's start: restored too, after a's
    assert then.restored_tokens > 0 and then.tokens == cold(tiny, b[:100])
    assert e.scheduler.prompt_cache.stats["hits"] == 2
    assert e.runner.host_blocks.allocated_bytes >= e.scheduler.prompt_cache.used_bytes


def test_a_small_budget_keeps_what_fits_evicts_the_oldest_and_stays_exact(tiny, texts):
    per_token = KVCache.bytes_per_token(tiny.model.args, torch.float32)
    budget_blocks = 20  # fewer than one prompt and a half
    e = engine(tiny, cache_ram_mb=budget_blocks * B * per_token / 2**20)
    assert e.scheduler.prompt_cache.capacity == budget_blocks
    for p in texts + texts[1::-1]:
        r = e.submit(p, GREEDY).result()
        assert r.tokens == cold(tiny, p)
        assert e.scheduler.prompt_cache.used_bytes <= budget_blocks * B * per_token
    stats = e.scheduler.prompt_cache.stats
    assert stats["evicted_blocks"] > 0 and stats["hits"] > 0


def test_a_zero_budget_has_no_prompt_cache_and_prompt_logprobs_reuse_nothing(tiny, texts):
    assert engine(tiny, cache_ram_mb=0).scheduler.prompt_cache is None
    e = engine(tiny)
    e.submit(texts[0], GREEDY).result()
    e.submit(texts[1], GREEDY).result()
    with_logprobs = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=True)
    r = e.submit(texts[0], with_logprobs).result()
    assert r.cached_tokens == 0 and r.restored_tokens == 0
    assert r.prompt_logprobs == pytest.approx(engine(tiny, cache_ram_mb=0).submit(texts[0], with_logprobs)
                                              .result().prompt_logprobs, abs=1e-5)


def test_a_failed_copy_drops_the_prompt_cache_and_fails_only_the_request_it_served(tiny, texts, monkeypatch):
    e = engine(tiny, max_batch_size=2)
    e.submit(texts[0], GREEDY).result()
    e.submit(texts[1], GREEDY).result()
    e.submit(texts[2], GREEDY).result()  # texts[0] is saved to host memory as its slot is overwritten
    assert e.scheduler.prompt_cache.match(texts[0])
    running = e.submit(texts[1] + texts[3][1:9], SamplingParams(temperature=0, max_tokens=40))
    while not running.tokens:
        e.step()
    apply = e.runner.apply_cache_ops

    def failing(ops):
        if ops:
            raise RuntimeError("host memory lost")
        apply(ops)

    monkeypatch.setattr(e.runner, "apply_cache_ops", failing)
    with pytest.raises(RuntimeError, match="host memory lost"):
        e.submit(texts[0] + texts[3][1:20], GREEDY).result()  # its restore fails: it alone fails
    assert not e.scheduler.prompt_cache.blocks  # nothing copied out earlier is trusted any more
    monkeypatch.setattr(e.runner, "apply_cache_ops", apply)
    assert running.result().tokens == engine(tiny, cache_ram_mb=0).submit(running.prompt, running.params).result().tokens
    assert e.submit(texts[0], GREEDY).result().tokens == cold(tiny, texts[0])


def test_a_failed_forward_keeps_the_prompt_cache(tiny, texts, monkeypatch):
    e = engine(tiny)
    e.submit(texts[0], GREEDY).result()
    e.submit(texts[1], GREEDY).result()
    execute = e.runner.execute
    monkeypatch.setattr(e.runner, "execute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        e.submit(texts[0] + texts[2][1:9], GREEDY).result()
    monkeypatch.setattr(e.runner, "execute", execute)
    again = e.submit(texts[0] + texts[2][1:9], GREEDY).result()  # the blocks were saved before: still good
    assert again.restored_tokens > 0 and again.tokens == cold(tiny, texts[0] + texts[2][1:9])


# ----------------------------------------------------------------------------- chunk reuse: the arithmetic
def test_re_rotated_keys_match_rope_in_float64():
    torch.manual_seed(0)
    hd, theta, T, L, Hkv, S = 64, 1e6, 40, 2, 3, 4096
    inv64 = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    raw = torch.randn(L, Hkv, T, hd, dtype=torch.float64)  # keys before RoPE

    def rope64(x, positions):  # Meta's interleaved pairs, everything in float64
        a = positions.double()[:, None] * inv64  # (T, hd/2)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * a.cos() - x1 * a.sin(), x0 * a.sin() + x1 * a.cos()
        return out

    inv32 = rope_inv_freq(hd, theta)
    for old_start, new_start in ((100, 3000), (3500, 7), (1000, 1001)):
        old, new = torch.arange(old_start, old_start + T), torch.arange(new_start, new_start + T)
        cache = KVCache(L, 2, S, Hkv, hd, torch.float32)
        a32 = old.float()[:, None] * inv32  # the model's own float32 angles
        k32 = raw.float()
        rotated = torch.empty_like(k32)  # what the model caches at the old positions
        rotated[..., 0::2] = k32[..., 0::2] * a32.cos() - k32[..., 1::2] * a32.sin()
        rotated[..., 1::2] = k32[..., 0::2] * a32.sin() + k32[..., 1::2] * a32.cos()
        cache.k[:, 1, :, old] = rotated
        cache.v[:, 1, :, old] = raw.float()
        cache.move(1, old, new, inv32)
        want = rope64(raw, new)
        moved = cache.k[:, 1, :, new].double()
        direct = torch.empty_like(k32)  # the model's own float32 keys at the new positions
        b32 = new.float()[:, None] * inv32
        direct[..., 0::2] = k32[..., 0::2] * b32.cos() - k32[..., 1::2] * b32.sin()
        direct[..., 1::2] = k32[..., 0::2] * b32.sin() + k32[..., 1::2] * b32.cos()
        own_error = (direct.double() - want).abs().max()
        assert (moved - want).abs().max() <= 2 * own_error + 1e-6  # as close as the model's own float32 keys
        assert torch.equal(cache.v[:, 1, :, new], raw.float())  # values are moved unchanged
        if abs(new_start - old_start) >= T:
            assert torch.equal(cache.k[:, 0], torch.zeros_like(cache.k[:, 0]))  # other slots untouched


def test_rope_shift_angles_are_the_difference_of_the_models_angles():
    inv = rope_inv_freq(128, 1e6)
    old, new = torch.tensor([5, 4000]), torch.tensor([4001, 3])
    cos, sin = rope_shift_angles(old, new, inv)
    want = (new.float()[:, None] * inv).double() - (old.float()[:, None] * inv).double()
    assert torch.allclose(cos.double(), want.cos(), atol=1e-7) and torch.allclose(sin.double(), want.sin(), atol=1e-7)


@pytest.mark.parametrize("name", ["gqa"])
def test_moved_first_layer_keys_equal_the_models_own_and_deeper_ones_are_counted_as_approximate(name):
    """In layer 0 a token's key depends on the token and its position only: moved keys there must equal the keys
    the model computes at the new position. Deeper layers saw other text, which is why chunk reuse is opt-in."""
    args = CONFIGS[name]
    model = random_model(args, seed=3)
    torch.manual_seed(1)
    shared = torch.randint(3, args.vocab_size, (60,)).tolist()
    old_prompt = [1] + [7] * 25 + shared + [9]  # the shared text at positions 26 …
    new_prompt = [1] + [8] * 4 + shared + [9]  # … and at 5 …
    e = Engine(model, None, max_batch_size=1, max_seq_len=128, cache_ram_mb=0, cache_reuse=16)
    e.submit(old_prompt, SamplingParams(temperature=0, max_tokens=1), text=False).result()
    r = e.submit(new_prompt, SamplingParams(temperature=0, max_tokens=1), text=False).result()
    assert r.shifted_tokens == len(shared) and r.cached_tokens == 1 + len(shared)
    ref = Engine(model, None, max_batch_size=1, max_seq_len=128, cache_ram_mb=0)
    ref.submit(new_prompt, SamplingParams(temperature=0, max_tokens=1), text=False).result()
    at = slice(5, 5 + len(shared))
    torch.testing.assert_close(e.cache.k[0, 0, :, at], ref.cache.k[0, 0, :, at], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(e.cache.v[0, 0, :, at], ref.cache.v[0, 0, :, at], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(e.cache.k[1, 0, :, at], ref.cache.k[1, 0, :, at], atol=1e-3)


def test_chunk_reuse_counts_moved_tokens_and_computes_the_rest_in_order(tiny, texts):
    e = engine(tiny, cache_ram_mb=0, cache_reuse=32, max_tokens_per_step=24)
    a = texts[3]
    e.submit(a, GREEDY).result()
    edited = a[:40] + tiny.tokenizer.encode("x = 1\n", bos=False, eos=False) + a[40:]  # a line typed in the middle
    prefix = next(i for i, (x, y) in enumerate(zip(a, edited)) if x != y)
    r = e.submit(edited, GREEDY)
    r.result()
    assert r.shifted_tokens == len(a) - 40 - 1 and r.cached_tokens == prefix + r.shifted_tokens
    assert r.finish_reason == "length" and len(r.tokens) == GREEDY.max_tokens
    assert e.scheduler.slots[0].cached[:len(edited)] == edited  # the slot holds the edited prompt, in order


def test_chunk_reuse_takes_runs_from_what_followed_a_restored_start(tiny, texts):
    """A file the editor comes back to, its window slid: the start is restored from host memory with what
    followed it there, and the rest is moved into place from that."""
    e = engine(tiny, cache_reuse=32)
    a = texts[3]
    e.submit(a, GREEDY).result()
    e.submit(texts[0], GREEDY).result()  # a leaves the only slot for host memory
    slid = a[:70] + a[80:]  # ten tokens gone after the first 70
    r = e.submit(slid, GREEDY).result()
    assert r.restored_tokens == 64 - 1 and r.shifted_tokens == len(slid) - 1 - 70
    assert r.cached_tokens == 70 + r.shifted_tokens - (70 - 64)  # tokens 64 … 69 of the partial block computed


def test_a_follower_mirrors_the_moved_runs():
    """Under tensor parallelism rank 0 plans; the others replay its plan and must skip the same runs."""
    def sched():
        return Scheduler(1, 256, 8, prompt_cache=PromptCache(10**6, 10), cache_reuse=4)

    leader, follower = sched(), sched()
    old, new = list(range(3, 43)), list(range(3, 13)) + [100, 101] + list(range(13, 43))
    for s in (leader, follower):
        s.slots[0].cached = list(old)
    rl, rf = (Request(None, 0, new, GREEDY, limit=4) for _ in range(2))
    leader.add(rl)
    follower.add(rf)
    while rl.computed < len(new):
        plan = leader.schedule()
        follower.follow(plan)
        for f in plan.forwards:
            leader.prefilled(rl, f.tokens[0])
            follower.prefilled(rf, f.tokens[0])
        if any(isinstance(op, ShiftRuns) for op in plan.cache_ops):
            assert plan.cache_ops[-1] == ShiftRuns(0, 0, [(10, 12, 29)])
        assert (rl.computed, rl.runs) == (rf.computed, rf.runs)
    assert rl.shifted_tokens == rf.shifted_tokens == 29


# ----------------------------------------------------------------------------- sessions
def test_a_newer_request_of_the_same_session_supersedes_and_takes_over_its_prefix(tiny, texts):
    e = engine(tiny, max_batch_size=2, max_tokens_per_step=32, cache_ram_mb=0)
    first = e.submit(texts[3], GREEDY, session=("client", 0))
    other = e.submit(texts[1], GREEDY, session=("client", 1))
    for _ in range(3):  # three chunks of the first prompt computed
        e.step()
    computed = first.computed
    assert 0 < computed < len(texts[3])
    warm = e.submit(texts[0], SamplingParams(temperature=0, max_tokens=0), session=("client", 0), supersede=False)
    assert not first.cancel_requested  # a cache warm-up stops nobody
    newer = e.submit(texts[3] + texts[2][1:20], GREEDY, session=("client", 0))
    e.step()
    assert first.done and first.finish_reason == "cancelled" and first.superseded
    assert warm.superseded and not other.superseded and not other.done
    newer.result()
    assert newer.cached_tokens >= computed  # what the superseded request computed was not computed again
    assert newer.tokens == cold(tiny, texts[3] + texts[2][1:20])
    assert other.result().tokens == cold(tiny, texts[1])
