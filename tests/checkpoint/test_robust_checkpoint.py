"""Corrupt, inconsistent or ambiguous checkpoint files: a ValueError / FileNotFoundError naming the file and the problem."""

import argparse
import json
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codellama import ModelArgs, load_model, open_checkpoint
from codellama import checkpoint
from codellama.formats import check_checkpoint_dir

from helpers import write_checkpoint

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16)


def edit_shard(path, change):
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


# ----------------------------------------------------------------------------- the directory itself
def test_a_missing_directory_or_a_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nope"):
        check_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "model.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model.pth is a file, not a checkpoint directory"):
        load_model(tmp_path / "model.pth")


def test_both_layouts_in_one_directory_are_refused(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", seed=1)
    write_checkpoint(tmp_path / "hf", ARGS, "hf", seed=2)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "hf" / name, tmp_path / name)
    with pytest.raises(ValueError, match="ambiguous: it holds params.json .* and config.json .* weights of both"):
        open_checkpoint(tmp_path)
    os.remove(tmp_path / "model.safetensors")  # a config.json alone does not make it ambiguous
    assert open_checkpoint(tmp_path).layout == "meta"


def test_model_safetensors_next_to_an_index_is_refused(tmp_path):
    """A stale index would win over a new model.safetensors, loading the old weights silently."""
    write_checkpoint(tmp_path, ARGS, "hf", seed=1, max_shard_bytes=20_000)
    write_checkpoint(tmp_path / "new", ARGS, "hf", seed=2)
    shutil.copy(tmp_path / "new" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="ambiguous: it holds both model.safetensors and model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_two_files_for_one_shard_are_refused(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    shutil.copy(tmp_path / "consolidated.01.pth", tmp_path / "consolidated.1.pth")
    with pytest.raises(ValueError, match="ambiguous: consolidated.01.pth and consolidated.1.pth are the same shard"):
        open_checkpoint(tmp_path)


def test_a_missing_last_shard_is_named(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    os.remove(tmp_path / "consolidated.01.pth")
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) consolidated.01.pth missing: dim is 32 in params.json"):
        open_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- Meta shards
def test_shards_that_disagree_on_a_dimension_that_is_not_split(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    key = "layers.0.attention.wq.weight"  # split along dim 0: dim 1 must agree
    edit_shard(tmp_path / "consolidated.01.pth", lambda sd: sd.update({key: torch.zeros(16, 24)}))
    with pytest.raises(ValueError, match=rf"{key} has shape \(16, 24\) in .*consolidated.01.pth but \(16, 32\) in "
                                         r".*consolidated.00.pth: shards may differ only along dim 0"):
        open_checkpoint(tmp_path)


def test_a_replicated_tensor_that_differs_between_shards(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    edit_shard(tmp_path / "consolidated.01.pth", lambda sd: sd["norm.weight"].add_(1))
    with pytest.raises(ValueError, match=r"norm.weight differs between .*consolidated.00.pth and .*consolidated.01.pth: "
                                         "it is replicated"):
        open_checkpoint(tmp_path)


def test_shards_of_different_dtypes(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    key = "layers.1.feed_forward.w2.weight"
    edit_shard(tmp_path / "consolidated.01.pth", lambda sd: sd.update({key: sd[key].half()}))
    with pytest.raises(ValueError, match=rf"{key} is torch.float16 in .*consolidated.01.pth but torch.float32"):
        open_checkpoint(tmp_path)


def test_n_layers_far_beyond_the_checkpoint_fails_before_building_anything(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, ARGS, "meta")
    (tmp_path / "params.json").write_text(json.dumps({**ARGS.to_params(), "n_layers": 100_000}))
    monkeypatch.setattr(checkpoint, "build_on_meta", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"n_layers 100000 in the config, but the checkpoint holds 2 layer\(s\), "
                                         "numbered 0…1"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- .pth payloads
def test_a_legacy_format_pth_of_plain_tensors_loads(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", seed=3)
    path = tmp_path / "consolidated.00.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload, what", [
    (lambda sd: {"model": sd, "args": argparse.Namespace(lr=1e-4)}, "pickles argparse.Namespace"),
    (lambda sd: torch.nn.Linear(2, 2), "pickles torch.nn.modules.linear.Linear"),
])
def test_a_pth_that_is_not_weights_only_says_what_it_is(tmp_path, payload, what, legacy):
    write_checkpoint(tmp_path, ARGS, "meta")
    path = tmp_path / "consolidated.00.pth"
    torch.save(payload(torch.load(path, weights_only=True)), path, _use_new_zipfile_serialization=not legacy)
    kind = "legacy-format PyTorch file" if legacy else "PyTorch zip file"
    with pytest.raises(ValueError, match=f"refusing to load .*consolidated.00.pth: not a weights-only state dict: this "
                                         f"{kind} {what}.*it was not unpickled"):
        load_model(tmp_path)


def test_a_training_checkpoint_names_the_nested_dict(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    path = tmp_path / "consolidated.00.pth"
    torch.save({"model": torch.load(path, weights_only=True), "step": torch.tensor(3)}, path)
    with pytest.raises(ValueError, match=r"entry 'model' is a dict, expected a tensor \(a nested dict"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- safetensors files and the index
def test_truncated_or_header_corrupt_safetensors(tmp_path):
    write_checkpoint(tmp_path, ARGS, "hf")
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    for bad in (good[:-10], good[:5], struct.pack("<Q", 10**12) + good[8:], good[:8] + b"[" + good[9:]):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file \(truncated or corrupt\)"):
            load_model(tmp_path)


@pytest.fixture
def sharded(tmp_path):
    write_checkpoint(tmp_path, ARGS, "hf", max_shard_bytes=20_000)
    index = tmp_path / "model.safetensors.index.json"
    return index, json.loads(index.read_text())


def test_an_index_naming_a_tensor_its_shard_lacks(sharded):
    index, data = sharded
    name, fname = next(iter(data["weight_map"].items()))
    other = next(f for f in data["weight_map"].values() if f != fname)
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"index.json places tensor {name} in .*{other}, which does not hold it"):
        open_checkpoint(index.parent)


@pytest.mark.parametrize("value", [3, None, ["model-00001-of-00002.safetensors"], "../model.safetensors", "/etc/passwd",
                                   "sub/model.safetensors", ".."])
def test_weight_map_values_must_be_shard_file_names(sharded, value):
    index, data = sharded
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = value
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"index.json: weight_map\['{name}'\] is .*; each value must be the name of a "
                                         "safetensors file in"):
        open_checkpoint(index.parent)


def test_a_missing_shard_listed_in_the_index(sharded):
    index, data = sharded
    fname = sorted(set(data["weight_map"].values()))[-1]
    os.remove(index.parent / fname)
    with pytest.raises(FileNotFoundError, match=f"{fname} is listed in .*index.json but missing"):
        open_checkpoint(index.parent)


# ----------------------------------------------------------------------------- corrupted bytes, any of them
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    small = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=8)
    return {"meta": write_checkpoint(root / "meta", small, "meta", shards=2),
            "hf": write_checkpoint(root / "hf", small, "hf", max_shard_bytes=2_000)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_load_or_fail_with_an_error_naming_the_file(pristine, tmp_path, data):
    layout = data.draw(st.sampled_from(["meta", "hf"]))
    ckpt = tmp_path / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(pristine[layout], ckpt)
    name = data.draw(st.sampled_from(sorted(os.listdir(ckpt))))
    raw = bytearray((ckpt / name).read_bytes())
    cut = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()):  # truncate
        raw = raw[:cut]
    else:  # overwrite a few bytes
        patch = data.draw(st.binary(min_size=1, max_size=8))
        raw[cut:cut + len(patch)] = patch
    (ckpt / name).write_bytes(bytes(raw))
    try:
        load_model(ckpt, device="cpu", optimize=False)
    except (ValueError, FileNotFoundError) as e:
        assert str(ckpt) in str(e)
