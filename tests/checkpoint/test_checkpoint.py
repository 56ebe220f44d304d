import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from codellama import Llama, ModelArgs, Tokenizer, load_model, open_checkpoint
from codellama.formats import detect_layout
from codellama.formats.hf import permute_from_hf, permute_to_hf, save_hf_tokenizer
from codellama.formats.meta import split_for_shards
from codellama.save import convert_checkpoint as convert

from helpers import CONFIGS, random_state_dict, write_checkpoint

ARGS = CONFIGS["gqa"]


def state_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_shards_merge_into_one_model(tmp_path, shards):
    write_checkpoint(tmp_path, ARGS, "meta", seed=5, shards=shards)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == shards
    assert_same_state(state_of(load_model(tmp_path, device="cpu")), random_state_dict(ARGS, seed=5))


def test_shard_axes_are_meta_model_parallel_axes():
    """Column-parallel weights split rows, row-parallel split columns, the embedding splits its dim; norms replicate."""
    w = torch.arange(24.0).view(4, 6)
    assert [t.shape for t in split_for_shards("layers.0.attention.wq.weight", w, 2)] == [(2, 6), (2, 6)]
    assert [t.shape for t in split_for_shards("output.weight", w, 2)] == [(2, 6), (2, 6)]
    assert [t.shape for t in split_for_shards("layers.0.feed_forward.w2.weight", w, 2)] == [(4, 3), (4, 3)]
    assert [t.shape for t in split_for_shards("tok_embeddings.weight", w, 2)] == [(4, 3), (4, 3)]
    n = torch.ones(6)
    assert all(t is n for t in split_for_shards("norm.weight", n, 2))


def test_a_13b_style_two_shard_checkpoint_written_shard_by_shard(tmp_path):
    """Shards built by hand the way Meta's MP=2 ranks hold them (not with our writer) load on one device."""
    full = random_state_dict(ARGS, seed=6)
    axes = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for rank in range(2):
        shard = {"rope.freqs": torch.zeros(4)}
        for k, v in full.items():
            dim = axes.get(k.split(".")[-2])
            shard[k] = v if dim is None else v.chunk(2, dim=dim)[rank].clone()
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({**ARGS.to_params(), "vocab_size": -1}))
    assert_same_state(state_of(load_model(tmp_path, device="cpu")), full)


def test_hf_sharded_safetensors_with_index(tmp_path):
    write_checkpoint(tmp_path, ARGS, "hf", seed=7, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_state(state_of(load_model(tmp_path, device="cpu")), random_state_dict(ARGS, seed=7))


def test_qk_permutation_round_trips():
    w = torch.randn(6 * 16, 96)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 6), 6), w)
    assert not torch.equal(permute_to_hf(w, 6), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_meta_hf_meta_is_exact(tmp_path, dtype):
    write_checkpoint(tmp_path / "a", ARGS, "meta", seed=8, dtype=dtype, shards=2)
    convert(tmp_path / "a", tmp_path / "b", "hf")
    assert detect_layout(tmp_path / "b") == "hf"
    convert(tmp_path / "b", tmp_path / "c", "meta", num_shards=2)
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        c = torch.load(tmp_path / "c" / name, weights_only=True)
        assert_same_state(a, c)
    back = ModelArgs.from_params_json(tmp_path / "c" / "params.json")
    # HF stores only the FFN size, so (multiple_of, ffn_dim_multiplier) may come back as another pair giving it
    assert back.hidden_dim == ARGS.hidden_dim
    assert dataclasses.replace(back, multiple_of=1, ffn_dim_multiplier=None) == \
        dataclasses.replace(ARGS, multiple_of=1, ffn_dim_multiplier=None)


def test_convert_hf_meta_hf_is_exact_via_the_command_line(tmp_path):
    from safetensors.torch import load_file
    write_checkpoint(tmp_path / "a", ARGS, "hf", seed=9)
    for src, dst, to in (("a", "b", "meta"), ("b", "c", "hf")):
        r = subprocess.run([sys.executable, "-m", "codellama.convert", str(tmp_path / src), str(tmp_path / dst), "--to", to],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert_same_state(load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors"))
    assert json.loads((tmp_path / "c" / "config.json").read_text()) == json.loads((tmp_path / "a" / "config.json").read_text())


def test_convert_command_reports_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "codellama.convert", str(tmp_path / "missing"), str(tmp_path / "x"),
                        "--to", "hf"], capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint directory not found" in r.stderr and "Traceback" not in r.stderr


def test_dtype_and_device_options(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", seed=1, dtype=torch.bfloat16)
    assert load_model(tmp_path, device="cpu").output.weight.dtype == torch.float32  # CPU default is fp32
    m = load_model(tmp_path, device="cpu", dtype="bf16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*bf16"):
        load_model(tmp_path, device="cpu", dtype="fp8")


def test_stray_rope_freqs_is_dropped_by_name(stories_dir):
    sd = torch.load(stories_dir / "meta" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert "rope.freqs" in sd
    assert "rope.freqs" not in open_checkpoint(stories_dir / "meta").tensors


# ----------------------------------------------------------------------------- bad input
def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"expected params.json.*config.json"):
        load_model(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(ARGS.to_params()))
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.\*\.pth"):
        load_model(tmp_path)


def test_missing_shard_in_the_numbering(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    os.rename(tmp_path / "consolidated.01.pth", tmp_path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) consolidated.01.pth missing.*numbered 00…02"):
        load_model(tmp_path)


def test_corrupt_and_unknown_params_json(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    (tmp_path / "params.json").write_text('{"dim": 96,')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**ARGS.to_params(), "max_batch": 4}))
    with pytest.raises(ValueError, match=r"unknown model parameter\(s\) \['max_batch'\]"):
        load_model(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del sd["layers.1.feed_forward.w3.weight"]
    sd["layers.1.feed_forward.w4.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['layers.1.feed_forward.w3.weight'\].*"
                                         r"unexpected key\(s\) \['layers.1.feed_forward.w4.weight'\]"):
        load_model(tmp_path)


def test_unknown_weight_name_in_a_sharded_checkpoint(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", shards=2)
    for i in range(2):
        sd = torch.load(tmp_path / f"consolidated.{i:02d}.pth", weights_only=True)
        sd["layers.0.attention.wx.weight"] = torch.zeros(2)
        torch.save(sd, tmp_path / f"consolidated.{i:02d}.pth")
    with pytest.raises(ValueError, match="unknown parameter 'layers.0.attention.wx.weight'"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    sd["layers.0.attention.wk.weight"] = torch.zeros(48, 96)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"layers.0.attention.wk.weight has shape \(48, 96\).*expects \(32, 96\)"):
        load_model(tmp_path)


def test_vocab_size_disagreeing_with_the_weights(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    (tmp_path / "params.json").write_text(json.dumps({**ARGS.to_params(), "vocab_size": 32000}))
    with pytest.raises(ValueError, match="vocab_size 32000.*260 rows"):
        load_model(tmp_path)


def test_non_tensor_payload_is_refused(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    sd["notes"] = "hello"
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="entry 'notes' is a str, expected a tensor"):
        load_model(tmp_path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": _Exploit(marker)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="refusing to load .*consolidated.00.pth: not a weights-only"):
        load_model(tmp_path)
    assert not marker.exists()


def test_corrupt_pth(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    (tmp_path / "consolidated.00.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="refusing to load"):
        load_model(tmp_path)


def test_hf_without_safetensors(tmp_path):
    write_checkpoint(tmp_path, ARGS, "hf")
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*\.bin checkpoints are pickles"):
        load_model(tmp_path)


def test_tokenizer_vocab_mismatch_is_refused_at_build(stories_dir, llama2_tokenizer_path):
    with pytest.raises(ValueError, match=r"llama2.model has 32000 pieces but the model's vocab_size is 512"):
        Llama.build(str(stories_dir / "meta"), str(llama2_tokenizer_path), device="cpu")


def test_build_needs_a_tokenizer(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta")
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*tokenizer.model"):
        Llama.build(str(tmp_path), device="cpu")


def test_build_names_a_wrong_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Llama.build(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory"):
        Llama.build(str(tmp_path / "file"), device="cpu")


def test_tokenizer_matching_the_vocab_is_accepted(tmp_path, codellama_tokenizer_path):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32016)
    write_checkpoint(tmp_path, args, "meta", tokenizer=str(codellama_tokenizer_path))
    llama = Llama.build(str(tmp_path), device="cpu")
    assert isinstance(llama.tokenizer, Tokenizer) and llama.model.args.vocab_size == 32016


# ----------------------------------------------------------------------------- Hugging Face interop (transformers)
# Code-like text that does not start with a space: transformers 5's CodeLlamaTokenizer (a Metaspace pre-tokenizer)
# adds no SentencePiece dummy prefix before a leading space, for HF's own Code Llama repositories as for ours.
TEXTS = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "This is a test", "Hi   Hello",
         "x\t\ty  \n\n  z", "héllo wörld ☺ 中文 😀", "if (a <= b) { return a->c[0]; }  // ok", "\n\nimport os", "a"]


@pytest.fixture(scope="module")
def bundled_hf(tmp_path_factory):
    from codellama.checkpoint import BUNDLED_CKPT_DIR
    dst = tmp_path_factory.mktemp("hf") / "tiny-hf"
    convert(BUNDLED_CKPT_DIR, dst, "hf")
    return dst


def hf_tokenizer_dir(tmp_path, tokenizer_path):
    """A converted HF directory's tokenizer files for ``tokenizer_path`` (the weights do not matter here)."""
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.model")
    save_hf_tokenizer(Tokenizer(str(tokenizer_path)), tmp_path)
    return tmp_path


@pytest.mark.parametrize("fixture", [None, "codellama_tokenizer_path", "llama2_tokenizer_path"],
                         ids=["bundled", "codellama-like", "llama2"])
def test_converted_tokenizer_loads_in_transformers_and_encodes_like_ours(tmp_path, bundled_hf, fixture, request):
    """The bundled model converted by ``convert --to hf``, and the shared tokenizers (with and without FIM pieces)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as FastTokenizer
    d = bundled_hf if fixture is None else hf_tokenizer_dir(tmp_path, request.getfixturevalue(fixture))
    ours = Tokenizer(str(d / "tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert type(hf).__name__ == "CodeLlamaTokenizer"
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert (hf.prefix_id, hf.middle_id, hf.suffix_id, hf.eot_id) == \
        (ours.prefix_id, ours.middle_id, ours.suffix_id, ours.eot_id)  # all None for llama2 (no infilling)
    fast = FastTokenizer.from_file(str(d / "tokenizer.json"))  # the file itself: exact, leading spaces included
    for text in TEXTS + [" Hello", "  two leading spaces"]:
        ids = ours.encode(text, bos=True, eos=False)
        assert fast.encode(text).ids == ids, text
        if not text.startswith(" "):
            assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids[1:]) == ours.decode(ids[1:])


def test_hf_greedy_generation_on_the_converted_bundled_model_equals_ours(bundled_hf):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(bundled_hf, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(bundled_hf, dtype=torch.float32, local_files_only=True)
    assert model.generation_config.eos_token_id == 2  # read from the generation_config.json written
    llama = Llama.build(None, max_seq_len=64, max_batch_size=1, device="cpu", dtype="fp32")
    ids = tok("def fizzbuzz(n: int):")["input_ids"]
    assert ids == llama.tokenizer.encode("def fizzbuzz(n: int):", bos=True, eos=False)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    if 2 in out:  # HF keeps the EOS it stops at; the reference API does not return it
        out = out[:out.index(2)]
    assert len(out) > 5 and out == llama.generate([ids], 20, temperature=0)[0][0]
