"""Bad values in params.json / config.json: a ValueError naming the file, the key, the value and what is valid."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codellama import ModelArgs
from codellama.formats import hf

VALID = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 1e6}
HF_VALID = hf.write_config(ModelArgs(**VALID, vocab_size=128))


def write_params(tmp_path, params, name="params.json"):
    path = tmp_path / name
    path.write_text(json.dumps(params))  # json.dumps writes NaN / Infinity, as a careless exporter would
    return path


@pytest.mark.parametrize("key, value, valid", [
    ("dim", "64", "a positive integer"), ("n_layers", 2.0, "a positive integer"), ("n_heads", None, "a positive integer"),
    ("n_layers", True, "a positive integer"), ("dim", 0, "a positive integer"), ("multiple_of", -16, "a positive integer"),
    ("n_kv_heads", 0, "a positive integer or None"), ("n_kv_heads", True, "a positive integer or None"),
    ("vocab_size", -2, "a positive integer or -1"), ("vocab_size", "32016", "a positive integer or -1"),
    ("norm_eps", True, "a number in [1e-12, 0.01]"), ("norm_eps", "1e-5", "a number in [1e-12, 0.01]"),
    ("norm_eps", 1e5, "a number in [1e-12, 0.01]"), ("norm_eps", 0.0, "a number in [1e-12, 0.01]"),
    ("norm_eps", math.nan, "a number in [1e-12, 0.01]"),
    ("rope_theta", math.inf, "a number in [10, 1e+12]"), ("rope_theta", 1.0, "a number in [10, 1e+12]"),
    ("rope_theta", [1e6], "a number in [10, 1e+12]"), ("ffn_dim_multiplier", math.inf, "a number in [0.01, 100]"),
    ("ffn_dim_multiplier", False, "a number in [0.01, 100]"),
])
def test_params_json_bad_value_names_file_key_value_and_valid(tmp_path, key, value, valid):
    path = write_params(tmp_path, {**VALID, key: value})
    with pytest.raises(ValueError) as e:
        ModelArgs.from_params_json(path)
    assert str(e.value).startswith(f"{path}: {key} must be {valid}") and str(e.value).endswith(f"got {value!r}")


def test_ffn_size_that_rounds_to_zero(tmp_path):
    path = write_params(tmp_path, {**VALID, "dim": 8, "n_heads": 2, "multiple_of": 1, "ffn_dim_multiplier": 0.01})
    with pytest.raises(ValueError, match="FFN hidden size is 0.*at least 1"):
        ModelArgs.from_params_json(path)


def test_non_utf8_params_json(tmp_path):
    path = tmp_path / "params.json"
    path.write_bytes(b'{"dim": 64, "note": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"params.json is not UTF-8 text: byte 0xe9 at offset 24"):
        ModelArgs.from_params_json(path)


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", "64", "hidden_size must be a positive integer, got '64'"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),  # ZeroDivisionError before
    ("intermediate_size", 176.0, "intermediate_size must be a positive integer, got 176.0"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer or null"),  # was silently n_heads
    ("rms_norm_eps", True, r"rms_norm_eps must be a number in \[1e-12, 0.01\], got True"),
    ("rope_theta", "1e6", r"rope_theta must be a number in \[10, 1e\+12\], got '1e6'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": math.nan}, "rope_parameters.rope_theta must be a number"),
])
def test_hf_config_bad_value_names_file_key_value_and_valid(tmp_path, key, value, match):
    path = write_params(tmp_path, {**HF_VALID, key: value}, "config.json")
    with pytest.raises(ValueError, match=f"config.json: {match}"):
        hf.read_config(path)


# Values a config file can hold: right, wrong-typed, zero, negative, non-finite, absurd.
ANY_VALUE = st.one_of(st.integers(-4, 300), st.sampled_from([0.0, 1e-5, 1e-6, 0.5, 1e5, 1e6, 1e30, -1.0, math.nan,
                                                             math.inf, -math.inf, True, False, None, "64", [64], {}]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(sorted(VALID) + ["n_kv_heads", "vocab_size", "ffn_dim_multiplier"]),
                               ANY_VALUE, max_size=3))
def test_any_params_json_loads_or_fails_with_a_value_error_naming_it(tmp_path, changes):
    path = write_params(tmp_path, {**VALID, **changes})
    try:
        args = ModelArgs.from_params_json(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}: ")
        return
    assert args.hidden_dim > 0 and math.isfinite(args.rope_theta) and 0 < args.norm_eps < 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                "rms_norm_eps", "rope_theta", "head_dim"]), ANY_VALUE, max_size=3))
def test_any_hf_config_loads_or_fails_with_a_value_error_naming_it(tmp_path, changes):
    path = write_params(tmp_path, {**HF_VALID, **changes}, "config.json")
    try:
        hf.read_config(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}: ")
