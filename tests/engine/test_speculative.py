"""Speculative decoding is exact: greedy output is plain greedy output, and sampling keeps the target's distribution."""

import pytest
import torch

from codellama import Llama, ModelArgs
from codellama.engine import Engine, SamplingParams
from codellama.engine.speculative import DraftModel, PromptLookup, Proposal, same_tokenizer, verify
from codellama.testing import random_model

CODE = '''def parse_headers(lines):
    """Return a dict of the headers in lines, names lowercased."""
    result = {}
    for line in lines:
        if not line.strip():
            break
        name, _, value = line.partition(":")
        result[name.strip().lower()] = value.strip()
    return result
'''
EDIT = CODE + "\n\n" + "\n".join(CODE.split("\n")[:3]) + "\n"  # the function again: the model copies it
PROMPTS = [EDIT, "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n", CODE]


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=512, max_batch_size=4, device="cpu")


def run(tiny, speculator, prompts, params, max_seq_len=512):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch_size=4, max_seq_len=max_seq_len, speculator=speculator)
    requests = [engine.submit(tiny.tokenizer.encode(p, bos=True, eos=False), prm) for p, prm in zip(prompts, params)]
    return [r.result() for r in requests], engine


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, **kw)


@pytest.fixture(scope="module")
def draft(tiny):
    """The bundled model in bf16 as its own draft: a pair that agrees often, but not always."""
    model = random_model(tiny.model.args, seed=0, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in tiny.model.state_dict().items()})
    return model


def speculators(draft):
    return {"prompt": lambda: PromptLookup(), "draft": lambda: DraftModel(draft, 4, 512, num_tokens=4)}


@pytest.mark.parametrize("mode", ["prompt", "draft"])
def test_greedy_is_token_identical_for_a_ragged_batch(tiny, draft, mode):
    lengths = [48, 12, 30, 40]  # rows finish at different steps
    params = [greedy(n) for n in lengths]
    plain, _ = run(tiny, None, PROMPTS, params)
    spec, engine = run(tiny, speculators(draft)[mode](), PROMPTS, params)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert engine.speculation["accepted"] > 10  # proposals were really accepted, several per step
    assert engine.speculation["steps"] < sum(lengths) / 2


def test_log_probabilities_of_accepted_proposals_are_the_plain_ones(tiny):
    params = [greedy(40, logprobs=True, top_logprobs=3)] * len(PROMPTS)
    plain, _ = run(tiny, None, PROMPTS, params)
    spec, engine = run(tiny, PromptLookup(), PROMPTS, params)
    assert engine.speculation["accepted"] > 10
    for a, b in zip(plain, spec):
        assert a.tokens == b.tokens
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in b.top_logprobs] == [[t for t, _ in top] for top in a.top_logprobs]
        assert [v for top in b.top_logprobs for _, v in top] == pytest.approx(
            [v for top in a.top_logprobs for _, v in top], abs=1e-4)


@pytest.mark.parametrize("mode", ["prompt", "draft"])
def test_stops_inside_a_proposal(tiny, draft, mode):
    plain, _ = run(tiny, None, [EDIT], [greedy(60)])
    tokens, text = plain[0].tokens, plain[0].text
    stop_id = tokens[30]  # a stop token deep in the copied stretch
    stop_text = text[len(text) // 2:len(text) // 2 + 5]
    cases = [greedy(60, stop_token_ids=(stop_id,)), greedy(60, stop=[stop_text]), greedy(7)]
    want, _ = run(tiny, None, [EDIT] * 3, cases)
    got, _ = run(tiny, speculators(draft)[mode](), [EDIT] * 3, cases)
    for w, g in zip(want, got):
        assert (g.tokens, g.text, g.finish_reason) == (w.tokens, w.text, w.finish_reason)
    assert got[0].tokens == tokens[:tokens.index(stop_id)] and got[1].finish_reason == "stop"


def test_proposals_never_run_past_the_context(tiny):
    prompt_len = len(tiny.tokenizer.encode(EDIT, bos=True, eos=False))
    want, _ = run(tiny, None, [EDIT], [greedy(100)], max_seq_len=prompt_len + 9)
    got, engine = run(tiny, PromptLookup(), [EDIT], [greedy(100)], max_seq_len=prompt_len + 9)
    assert got[0].tokens == want[0].tokens and len(got[0].tokens) == 9 and got[0].finish_reason == "length"


def test_prompt_lookup_backs_off_on_open_ended_text(tiny):
    """Text that repeats nothing: after two rejected proposals a row stops proposing for a while."""
    lookup = PromptLookup()
    _, engine = run(tiny, lookup, ["x"], [greedy(60)])
    stats = engine.speculation
    assert stats["proposed"] < 60  # far fewer proposals than steps × 10


# ----------------------------------------------------------------------------- sampling keeps the distribution
@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_rule_keeps_the_target_distribution(with_q):
    """Chi-square over many seeded draws of the first output token: it follows the target's distribution p,
    whatever the proposal (a deterministic one, as prompt lookup makes, or one drawn from a draft's q)."""
    V, N = 8, 3000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, V, generator=g) * 1.5
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=5)
    p = torch.softmax(logits[0], -1)
    q = torch.softmax(torch.randn(V, generator=g), -1)

    class Row:  # what verify reads of a request
        pass

    row = Row()
    row.params, row._generator = params, torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(N):
        if with_q:
            d = int(torch.multinomial(q, 1, generator=row._generator))
            proposal = Proposal([d], q[None])
        else:
            proposal = Proposal([3])
        n, nxt = verify(logits, proposal, row)
        counts[proposal.tokens[0] if n == 1 else nxt] += 1
    chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
    assert chi2 < 24.3  # 99.9% quantile of chi-square with 7 degrees of freedom


def test_sampled_speculation_is_seeded_and_stays_in_the_support(tiny):
    params = [SamplingParams(temperature=0.8, top_k=5, max_tokens=40, seed=3)]
    a, _ = run(tiny, PromptLookup(), [EDIT], params)
    b, _ = run(tiny, PromptLookup(), [EDIT], params)
    assert a[0].tokens == b[0].tokens


# ----------------------------------------------------------------------------- draft checks
def test_draft_needs_the_same_tokenizer(tiny, tmp_path):
    from codellama import Tokenizer
    from conftest import shared_path
    other = Tokenizer(shared_path("tokenizers", "llama2.model"))
    with pytest.raises(ValueError, match="same tokenizer"):
        same_tokenizer(other, tiny.tokenizer)
    same_tokenizer(tiny.tokenizer, tiny.tokenizer)


def test_speculation_options_are_checked(tiny):
    with pytest.raises(ValueError, match="min_ngram=3 is larger than max_ngram=2"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        PromptLookup(num_tokens=0)
    with pytest.raises(ValueError, match="compile=True"):
        Engine(tiny.model, tiny.tokenizer, compile=True, speculator=PromptLookup())
    small = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096)
    with pytest.raises(ValueError, match="num_tokens"):
        DraftModel(random_model(small), 2, 64, num_tokens=0)
