import dataclasses
import json

import pytest

from codellama import PRESETS, ModelArgs
from codellama.formats import hf

# The reference table (../shared/docs/reference.md): dim, layers, heads, kv heads, FFN hidden, vocab, rope_theta.
TABLE = {
    "7b": (4096, 32, 32, 32, 11008, 32016, 1e6), "7b-Python": (4096, 32, 32, 32, 11008, 32000, 1e6),
    "7b-Instruct": (4096, 32, 32, 32, 11008, 32016, 1e6),
    "13b": (5120, 40, 40, 40, 13824, 32016, 1e6), "13b-Python": (5120, 40, 40, 40, 13824, 32000, 1e6),
    "13b-Instruct": (5120, 40, 40, 40, 13824, 32016, 1e6),
    "34b": (8192, 48, 64, 8, 22016, 32000, 1e6), "34b-Python": (8192, 48, 64, 8, 22016, 32000, 1e6),
    "34b-Instruct": (8192, 48, 64, 8, 22016, 32000, 1e6),
    "70b": (8192, 80, 64, 8, 28672, 32016, 1e6), "70b-Python": (8192, 80, 64, 8, 28672, 32016, 1e4),
    "70b-Instruct": (8192, 80, 64, 8, 28672, 32016, 1e4),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_match_the_reference_table(name):
    a = ModelArgs.from_name(name)
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.hidden_dim, a.vocab_size, a.rope_theta) == TABLE[name]
    assert a.norm_eps == 1e-5


def test_every_preset_is_in_the_table():
    assert {k.lower() for k in TABLE} == set(PRESETS)


def test_preset_names_are_forgiving_about_case_and_prefix():
    assert ModelArgs.from_name("CodeLlama-7b-Python") == ModelArgs.from_name("7b-python")


def test_7b_parameter_count():
    assert 6.7e9 < ModelArgs.from_name("7b").num_params() < 6.8e9


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset '8b'.*7b-python"):
        ModelArgs.from_name("8b")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelArgs().dim = 1


def test_params_json_of_a_real_release(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
                             "norm_eps": 1e-5, "rope_theta": 1000000}))
    a = ModelArgs.from_params_json(p)
    assert a.vocab_size == -1 and a.rope_theta == 1e6 and a.hidden_dim == 11008


def test_params_json_without_rope_theta_defaults_to_10000(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    assert ModelArgs.from_params_json(p).rope_theta == 10000.0


def test_params_json_errors(tmp_path):
    p = tmp_path / "params.json"
    with pytest.raises(FileNotFoundError, match="params.json"):
        ModelArgs.from_params_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelArgs.from_params_json(p)
    p.write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "n_experts": 8}))
    with pytest.raises(ValueError, match=r"unknown model parameter\(s\) \['n_experts'\].*valid keys"):
        ModelArgs.from_params_json(p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ModelArgs.from_params_json(p)


@pytest.mark.parametrize("bad, match", [
    (dict(dim=100, n_heads=3), "not divisible by n_heads"),
    (dict(dim=64, n_heads=8, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(dim=0), "positive integer"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(dim=60, n_heads=4), "must be even"),
])
def test_invalid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**{"dim": 64, "n_heads": 4, **bad})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    a = ModelArgs.from_name(name)
    assert hf.read_config(hf.write_config(a)) == a


def test_hf_config_odd_ffn_sizes_round_trip():
    for a in (ModelArgs(dim=64, n_heads=8, multiple_of=4, vocab_size=512),
              ModelArgs(dim=120, n_heads=5, multiple_of=7, ffn_dim_multiplier=1.3, vocab_size=333),
              ModelArgs(dim=96, n_heads=6, multiple_of=1, ffn_dim_multiplier=0.5, vocab_size=10)):
        assert hf.read_config(hf.write_config(a)).hidden_dim == a.hidden_dim


def test_hf_config_rope_theta_in_transformers_5_layout():
    cfg = hf.write_config(ModelArgs.from_name("7b"))
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    assert hf.read_config(cfg).rope_theta == 1e6


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "only plain RoPE"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "only plain RoPE"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 64}, "head_dim"),
])
def test_hf_config_refuses_what_it_cannot_run(change, match):
    cfg = {**hf.write_config(ModelArgs.from_name("7b")), **change}
    with pytest.raises(ValueError, match=match):
        hf.read_config(cfg)


def test_hf_config_missing_keys():
    with pytest.raises(ValueError, match=r"missing key\(s\) \['intermediate_size'\]"):
        hf.read_config({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 9})
