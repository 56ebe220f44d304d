"""``python -m codellama.convert`` never damages its source and never leaves a half-written or stale destination."""

import hashlib
import os

import pytest
import torch

from codellama import ModelArgs, convert_checkpoint, load_model, save
from codellama.convert import main

from helpers import random_state_dict, write_checkpoint

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16)


def digest(directory):
    """Every file's bytes under ``directory``, by relative path."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def cli(capsys, *argv):
    """Run the command line in this process: (exit status, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def same_weights(ckpt, seed):
    state = {k: v for k, v in load_model(ckpt, device="cpu", optimize=False).state_dict().items()}
    want = random_state_dict(ARGS, seed=seed)
    return state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


@pytest.fixture
def src(tmp_path):
    return write_checkpoint(tmp_path / "src", ARGS, "meta", seed=1)


# ----------------------------------------------------------------------------- the source is never modified
@pytest.mark.parametrize("extra", [[], ["--shards", "2"]])
def test_converting_a_directory_onto_itself_is_refused_and_harmless(src, capsys, extra):
    before = digest(src)
    code, err = cli(capsys, src, src, "--to", "meta", *extra)  # was SIGBUS and a destroyed consolidated.00.pth
    assert code == 2 and err.startswith("error: refusing to convert") and "same directory or one holds the other" in err
    assert digest(src) == before


def test_overlapping_directories_are_refused(src, tmp_path, capsys):
    os.symlink(src, tmp_path / "alias")
    before = digest(src)
    for dst in (f"{src}/out", tmp_path / "alias", f"{src}/../src"):
        code, err = cli(capsys, src, dst, "--to", "hf")
        assert code == 2 and "refusing to convert" in err, dst
    code, err = cli(capsys, src, tmp_path, "--to", "hf", "--force")  # the output would hold the source
    assert code == 2 and "refusing to convert" in err
    assert digest(src) == before and not os.path.exists(f"{src}/out")


# ----------------------------------------------------------------------------- the destination
def test_a_non_empty_destination_needs_force(src, tmp_path, capsys):
    dst = write_checkpoint(tmp_path / "dst", ARGS, "meta", seed=2)
    before = digest(dst)
    code, err = cli(capsys, src, dst, "--to", "meta")
    assert code == 2 and "is not empty (consolidated.00.pth, params.json)" in err and "--force" in err
    assert digest(dst) == before


def test_force_removes_a_stale_shard(src, tmp_path, capsys):
    dst = write_checkpoint(tmp_path / "dst", ARGS, "meta", seed=2, shards=2)
    (tmp_path / "dst" / "NOTES.txt").write_text("mine")
    assert cli(capsys, src, dst, "--to", "meta", "--force")[0] == 0
    assert sorted(os.listdir(dst)) == ["NOTES.txt", "consolidated.00.pth", "params.json"]  # no stale consolidated.01
    assert same_weights(dst, seed=1)


def test_force_removes_a_stale_index_and_its_shards(src, tmp_path, capsys):
    dst = write_checkpoint(tmp_path / "dst", ARGS, "hf", seed=2, max_shard_bytes=20_000)
    assert cli(capsys, src, dst, "--to", "hf", "--force")[0] == 0
    assert not [f for f in os.listdir(dst) if f.startswith("model-") or f.endswith(".index.json")]
    assert same_weights(dst, seed=1)  # the old index used to win: the old weights loaded silently


def test_force_across_layouts_leaves_one_layout(src, tmp_path, capsys):
    dst = write_checkpoint(tmp_path / "dst", ARGS, "meta", seed=2)
    assert cli(capsys, src, dst, "--to", "hf", "--force")[0] == 0
    assert "params.json" not in os.listdir(dst) and "consolidated.00.pth" not in os.listdir(dst)
    assert same_weights(dst, seed=1)


def test_into_an_empty_existing_directory_and_through_missing_parents(src, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(capsys, src, tmp_path / "empty", "--to", "hf")[0] == 0
    assert cli(capsys, src, tmp_path / "a" / "b" / "c", "--to", "meta", "--shards", "2")[0] == 0
    assert same_weights(tmp_path / "empty", seed=1) and same_weights(tmp_path / "a" / "b" / "c", seed=1)


# ----------------------------------------------------------------------------- arguments, checked before anything is written
@pytest.mark.parametrize("argv, message", [
    (["--to", "meta", "--shards", "0"], "--shards: must be a positive integer, got 0"),
    (["--to", "meta", "--shards", "-1"], "--shards: must be a positive integer, got -1"),
    (["--to", "meta", "--shards", "two"], "--shards: 'two' is not an integer"),
    (["--to", "meta", "--shards", "3"], "cannot split this model into 3 Meta shards: n_heads=4, n_kv_heads=4, dim=32"),
    (["--to", "hf", "--shards", "2"], "num_shards does not apply to the 'hf' layout"),
    (["--to", "meta", "--max-shard-gb", "1"], "max_shard_bytes does not apply to the 'meta' layout"),
    (["--to", "hf", "--max-shard-gb", "0"], "--max-shard-gb: must be a positive size in GiB"),
    (["--to", "hf", "--max-shard-gb", "nan"], "--max-shard-gb: must be a positive size in GiB"),
    (["--to", "hf", "--max-shard-gb", "-1"], "--max-shard-gb: must be a positive size in GiB"),
    (["--to", "hf", "--dtype", "fp8"], "--dtype: invalid choice: 'fp8'"),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(src, tmp_path, capsys, argv, message):
    before = sorted(os.listdir(tmp_path))
    code, err = cli(capsys, src, tmp_path / "out", *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # no lone params.json, no temporary directory


@pytest.mark.parametrize("kwargs", [dict(num_shards=0), dict(num_shards=True), dict(num_shards=2.0),
                                    dict(to="gguf"), dict(dtype="int8"), dict(max_shard_bytes=0, to="hf")])
def test_bad_arguments_through_the_python_api(src, tmp_path, kwargs):
    with pytest.raises(ValueError):
        convert_checkpoint(src, tmp_path / "out", **{"to": "meta", **kwargs})
    assert not os.path.exists(tmp_path / "out")


def test_save_meta_with_a_bad_shard_count_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="cannot split this model into 3 Meta shards"):
        save.save_meta(random_state_dict(ARGS), ARGS, tmp_path / "out", num_shards=3)
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------- a run that fails half-way
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_while_writing_leaves_nothing_behind(src, tmp_path, monkeypatch, existing):
    dst = tmp_path / "new" / "dst"
    if existing:
        write_checkpoint(dst, ARGS, "meta", seed=2, shards=2)
    before = digest(tmp_path / "new") if existing else None
    real_save, calls = torch.save, []

    def save_then_fail(obj, path, *a, **kw):  # the first shard is written, the disk fills on the second
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(src, dst, "meta", num_shards=2, force=True)
    if existing:
        assert digest(tmp_path / "new") == before  # the old checkpoint is untouched, no temporary directory beside it
    else:
        assert not os.path.exists(tmp_path / "new")  # not even the parent directories it created


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_before_writing(tmp_path):
    from codellama.checkpoint import BUNDLED_CKPT_DIR
    src = write_checkpoint(tmp_path / "src", ARGS, "meta", tokenizer=os.path.join(BUNDLED_CKPT_DIR, "tokenizer.model"))
    with pytest.raises(ValueError, match="tokenizer.model has 4096 pieces but the model's vocab_size is 64"):
        convert_checkpoint(src, tmp_path / "out", "hf")
    assert not os.path.exists(tmp_path / "out")
