import pytest
import torch

from codellama.sampling import check_sampling_args, restrict_top_k, sample, sample_top_p, token_logprobs

PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)


def draw(fn, n=4000):
    g = torch.Generator().manual_seed(0)
    return torch.bincount(torch.cat([fn(g) for _ in range(n)]), minlength=4).float() / n


@pytest.mark.parametrize("p, support", [(0.4, {1}), (0.7, {1, 3}), (0.85, {1, 3, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_nucleus_and_renormalises(p, support):
    freq = draw(lambda g: sample_top_p(PROBS.clone(), p, g))
    assert {i for i in range(4) if freq[i] > 0} == support
    kept = torch.tensor([PROBS[0, i].item() if i in support else 0.0 for i in range(4)])
    assert torch.allclose(freq, kept / kept.sum(), atol=0.03)


def test_top_p_does_not_modify_its_input():
    probs = PROBS.clone()
    sample_top_p(probs, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(probs, PROBS)


def test_top_k_restricts_the_support():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(restrict_top_k(logits, 2)).tolist() == [[True, False, True, False]]
    freq = draw(lambda g: sample(logits, temperature=1.0, top_p=1.0, top_k=2, generator=g))
    assert freq[0] == freq[2] == 0 and freq[1] > freq[3] > 0.2


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 0.3, 0.2], [5.0, -1.0, 0.0]])
    assert sample(logits, temperature=0).tolist() == [1, 0]


def test_temperature_sharpens():
    logits = torch.log(PROBS)
    cold = draw(lambda g: sample(logits, temperature=0.3, top_p=1.0, generator=g))
    hot = draw(lambda g: sample(logits, temperature=3.0, top_p=1.0, generator=g))
    assert cold[1] > 0.75 and hot[1] < 0.4


def test_seeded_generators_reproduce():
    logits = torch.randn(3, 50)
    a = [sample(logits, 1.0, 0.9, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_token_logprobs():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(token_logprobs(logits, torch.tensor([2])), torch.log_softmax(logits, -1)[:, 2])


@pytest.mark.parametrize("args", [(-1.0, 0.9, None), (0.5, 0.0, None), (0.5, 1.01, None), (0.5, 0.9, 0),
                                  (float("nan"), 0.9, None), (0.5, 0.9, 2.5)])
def test_bad_sampling_args(args):
    with pytest.raises(ValueError):
        check_sampling_args(*args)
