"""GGUF checkpoints: llama.cpp's files load with the weights, configuration and tokenizer they hold.

A tiny random model of Code Llama's proportions (GQA, rope_theta 1e6, the Code Llama-like vocabulary when
../shared has it) is written as GGUF in each tensor type and compared with the same weights loaded from
Hugging Face's layout (whose q/k rows are permuted, so a wrong mapping cannot hide); the values each
quantized file stands for are taken from the ``gguf`` package's own dequantizer. The trained stories260K
model checks the whole path against its published greedy output, and against llama.cpp's own converter and
runtime where they are installed.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")

from codellama import Llama, ModelArgs, load_model, open_checkpoint  # noqa: E402
from codellama.formats.gguf import read_gguf  # noqa: E402
from codellama.quantize import Int4Linear, Int8Linear, QuantConfig, QuantizedEmbedding  # noqa: E402
from codellama.save import convert_checkpoint, save_hf  # noqa: E402
from codellama.testing import random_state_dict, write_gguf  # noqa: E402

from conftest import SHARED, shared_path  # noqa: E402

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, rope_theta=1e6)  # K-quants: 256s
SMALL = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300)  # for the files that must fail to load
MID = ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=300)  # K-quant-sized, with a vocabulary quick to read
PROMPT = torch.tensor([[1, 822, 18755, 29898, 29876, 1125, 13, 1678, 736, 302, 32007, 5, 31000, 2]])
FLOAT_TYPES = ("F32", "F16", "BF16")
# Each quantized type's logit error against the original fp32 weights on this random model (Gaussian weights:
# the worst case for few bits), as max |error| / max |logit|; measured 0.025 (Q8_0), 0.12 (Q6_K), 0.34 (Q4_K),
# 0.42 (Q4_0) with the same seed. The bounds leave room for other seeds, not for a misread block: that errs by
# more than the logits themselves.
KNOWN_ERROR = {"Q8_0": 0.05, "Q6_K": 0.2, "Q4_K": 0.6, "Q4_0": 0.7}


@pytest.fixture(scope="module")
def vocab():
    """The Code Llama-like tokenizer when ../shared has it; else the writer's synthetic vocabulary."""
    path = SHARED / "tokenizers" / "codellama-like.model"
    return str(path) if path.exists() else None


@pytest.fixture(scope="module")
def state():
    return random_state_dict(ARGS, seed=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def files(work, state, vocab):
    """GGUF file of each tensor type, written on first use."""
    written = {}

    def file(kind):
        if kind not in written:
            written[kind] = str(write_gguf(work / f"{kind}.gguf", state, ARGS, tokenizer_path=vocab, tensor_type=kind))
        return written[kind]
    return file


@pytest.fixture(scope="module")
def sources(files):
    """Each file opened once (reading a 32016-piece vocabulary takes the gguf package a second or two)."""
    opened = {}

    def source(kind):
        if kind not in opened:
            opened[kind] = open_checkpoint(files(kind))
        return opened[kind]
    return source


def hf_model(path, state, args=ARGS, **kwargs):
    """``state`` written in Hugging Face's layout (q/k rows permuted) and loaded back: the reference."""
    if not os.path.exists(path):
        save_hf(state, args, path)
    return load_model(path, device="cpu", dtype="fp32", **kwargs)


def file_values(source):
    """Every tensor of a GGUF file as the values it stands for, by the gguf package's own dequantizer (Meta names)."""
    if not hasattr(source, "raw"):
        source = open_checkpoint(source)
    return {key: torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[source.types[key]])).float()
            for key, raw in source.raw.items()}


def weight_of(module):
    """The (out, in) float weight a loaded layer holds, whatever its scheme."""
    if isinstance(module, QuantizedEmbedding):
        return module(torch.arange(module.num_embeddings))
    return module.dequantize(torch.float32) if isinstance(module, (Int4Linear, Int8Linear)) else module.weight


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- weights and configuration
def test_metadata_becomes_the_model_args(sources):
    source = sources("F32")
    assert source.layout == "gguf" and source.args == ARGS and source.context_length == 16384
    assert source.args.hidden_dim == ARGS.hidden_dim and source.args.kv_heads == 2


@pytest.mark.parametrize("kind", FLOAT_TYPES)
def test_float_types_load_exactly_as_the_hugging_face_layout(sources, state, work, kind):
    """F32/F16/BF16 matrices (norms F32, as llama.cpp writes them) give the logits of the same values in HF's layout."""
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
    same = {k: v.to(dtype).float() if v.dim() == 2 else v for k, v in state.items()}
    ref = hf_model(work / f"hf-{kind}", same)
    model = load_model(sources(kind), device="cpu", dtype="fp32")
    assert torch.equal(model(PROMPT, 0), ref(PROMPT, 0))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_quantized_types_load_the_values_the_file_stands_for(sources, state, work, kind):
    """Each weight equals the gguf package's dequantization of the file's blocks (Q4_0 as int4 g32: its codes
    and scales, exactly); the logits are those of the dequantized weights in HF's layout, and within the
    type's known error of the original weights."""
    source = sources(kind)
    values = file_values(source)
    model = load_model(source, device="cpu", dtype="fp32", optimize=False)
    for key, module in [("tok_embeddings", model.tok_embeddings), ("output", model.output),
                        ("layers.1.attention.wk", model.layers[1].attention.wk),
                        ("layers.0.feed_forward.w2", model.layers[0].feed_forward.w2)]:
        loaded = weight_of(module)
        if kind == "Q4_0":
            assert isinstance(module, (Int4Linear, QuantizedEmbedding)) and module.group_size == 32, key
        else:
            assert isinstance(module, (nn.Linear, nn.Embedding)), key
        assert torch.equal(loaded, values[f"{key}.weight"]), key
    exact = hf_model(work / f"hf-{kind}", values)
    out = load_model(source, device="cpu", dtype="fp32")(PROMPT, 0)  # with the CPU layout: int4 runs torch's kernel
    if kind == "Q4_0":  # torch's CPU int4 kernel takes bf16 activations and scales
        assert relative_error(out, exact(PROMPT, 0)) < 0.03
    else:
        assert torch.equal(out, exact(PROMPT, 0))
    original = hf_model(work / "hf-F32", state)
    assert relative_error(out, original(PROMPT, 0)) < KNOWN_ERROR[kind]


def test_q4_0_file_laid_out_as_llama_cpp_writes_it(work):
    """llama.cpp's Q4_0 files keep the output layer in Q6_K: int4 g32 layers and embedding, a float output layer."""
    path = write_gguf(work / "q4_0-q6k.gguf", random_state_dict(MID, seed=3), MID,
                      tensor_type=lambda key: "Q6_K" if key == "output.weight" else "Q4_0")
    model = load_model(path, device="cpu", dtype="fp32", optimize=False)
    assert isinstance(model.layers[0].attention.wq, Int4Linear) and isinstance(model.tok_embeddings, QuantizedEmbedding)
    assert isinstance(model.output, nn.Linear) and torch.equal(model.output.weight, file_values(path)["output.weight"])


def test_q4_0_codes_are_kept_and_the_scale_dtype_rounds_them(files, sources):
    """int4 g32 takes the file's codes byte for byte; in bf16 its fp16 scales are rounded (zeros stay 0)."""
    raw = next(t for t in read_gguf(files("Q4_0")).tensors if t.name == "blk.0.ffn_up.weight").data
    blocks = torch.from_numpy(raw.copy()).view(raw.shape[0], -1, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).view(raw.shape[0], -1)
    for dtype in (torch.float32, torch.bfloat16):
        layer = load_model(sources("Q4_0"), device="cpu", dtype=dtype, optimize=False).layers[0].feed_forward.w3
        assert torch.equal(layer.weight, blocks[..., 2:].reshape(raw.shape[0], -1))
        assert torch.equal(layer.scales, d.to(dtype)) and not layer.zeros.any()
    assert not torch.equal(d.to(torch.bfloat16).float(), d.float())  # so bf16 is not exact, as documented


def test_quantize_argument_gives_that_scheme(sources, state, work):
    """``quantize=`` requantizes whatever the file holds; int4 g32 of a Q4_0 file is the file itself."""
    model = load_model(sources("Q8_0"), device="cpu", dtype="fp32", optimize=False, quantize="int8")
    assert isinstance(model.layers[0].attention.wq, Int8Linear) and isinstance(model.output, nn.Linear)
    # the same as dequantizing to fp32 and quantizing on load
    on_load = hf_model(work / "hf-Q8_0", file_values(sources("Q8_0")), optimize=False, quantize="int8")
    assert torch.equal(model.layers[1].feed_forward.w2.weight, on_load.layers[1].feed_forward.w2.weight)
    native = load_model(sources("Q4_0"), device="cpu", dtype="fp32", optimize=False)
    asked = load_model(sources("Q4_0"), device="cpu", dtype="fp32", optimize=False,
                       quantize=QuantConfig("int4", 32, include_output=True, include_embeddings=True))
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(), asked.state_dict().values()))
    k = load_model(sources("Q4_K"), device="cpu", dtype="fp32", optimize=False, quantize="int4")
    assert isinstance(k.layers[0].attention.wv, Int4Linear) and k.layers[0].attention.wv.group_size == 64


def test_mixed_linear_types_are_dequantized(work):
    path = write_gguf(work / "mixed.gguf", random_state_dict(MID, seed=3), MID,
                      tensor_type=lambda key: "Q8_0" if key.endswith("w2.weight") else "Q4_0")
    model = load_model(path, device="cpu", dtype="fp32", optimize=False)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


# ----------------------------------------------------------------------------- Llama.build, folders, convert
def test_llama_build_from_a_file_and_from_a_folder(files, work, vocab, state):
    if vocab is None:
        pytest.skip("needs ../shared/data/tokenizers/codellama-like.model")
    ref_dir = work / "hf-F32-tok"
    save_hf(state, ARGS, ref_dir)
    shutil.copyfile(vocab, ref_dir / "tokenizer.model")
    folder = work / "folder"
    folder.mkdir()
    os.link(files("F32"), folder / "codellama-7b.F32.gguf")
    (folder / "config.json").write_text("{}")  # a model repository's folder: config.json beside the GGUF file
    ref = Llama.build(str(ref_dir), max_seq_len=64, max_batch_size=1, device="cpu")
    want = ref.text_infilling(["def f(x):\n    "], ["\n    return y\n"], temperature=0, max_gen_len=8)
    for where in (files("F32"), str(folder)):
        llama = Llama.build(where, max_seq_len=64, max_batch_size=1, device="cpu")
        assert llama.tokenizer.model_path.endswith(".gguf") and llama.tokenizer.prefix_id == 32007
        assert llama.text_infilling(["def f(x):\n    "], ["\n    return y\n"], temperature=0, max_gen_len=8) == want
    explicit = Llama.build(files("F32"), vocab, max_seq_len=64, max_batch_size=1, device="cpu")
    assert explicit.tokenizer.model_path == vocab  # a tokenizer_path given wins over the file's vocabulary


def test_a_folder_with_two_gguf_files_names_them(work, files):
    folder = work / "two"
    folder.mkdir()
    for name in ("a.Q4_0.gguf", "b.Q8_0.gguf"):
        os.link(files("F32"), folder / name)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.Q4_0.gguf, b.Q8_0.gguf\); pass the one"):
        load_model(folder, device="cpu")


def test_hf_or_meta_weights_beside_a_gguf_file_win(work, files, state):
    """llama.cpp's converter writes its output into the model's folder: that folder still loads as it did."""
    folder = work / "hf-with-gguf"
    save_hf(state, ARGS, folder)
    os.link(files("Q4_0"), folder / "model-Q4_0.gguf")
    assert open_checkpoint(folder).layout == "hf"


def test_convert_dequantizes_and_never_touches_the_source(files, sources, work, vocab):
    path = files("Q4_K")
    before = (hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns)
    convert_checkpoint(path, work / "converted", "hf")
    assert (hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns) == before
    out = load_model(work / "converted", device="cpu", dtype="fp32")
    assert torch.equal(out(PROMPT, 0), load_model(sources("Q4_K"), device="cpu", dtype="fp32")(PROMPT, 0))
    if vocab is not None:  # the file's vocabulary became a tokenizer.model that SentencePiece reads as the original
        from codellama import Tokenizer
        text = "def f(x):\n\t return x  # <PRE> é 漢 \U0001F600"
        assert Tokenizer(work / "converted" / "tokenizer.model").encode(text, True, False) == \
            Tokenizer(vocab).encode(text, True, False)


def test_convert_command_reads_a_gguf_file(tmp_path):
    path = small_file(tmp_path, tensor_type="F16")
    r = subprocess.run([sys.executable, "-m", "codellama.convert", path, str(tmp_path / "meta"), "--to", "meta",
                        "--dtype", "bf16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert out["layers.1.feed_forward.w2.weight"].dtype == torch.bfloat16
    assert (tmp_path / "meta" / "tokenizer.model").is_file()


# ----------------------------------------------------------------------------- files that must not load
def small_file(tmp_path, name="bad.gguf", state=None, **kwargs):
    state = random_state_dict(SMALL, seed=2) if state is None else state
    return str(write_gguf(tmp_path / name, state, SMALL, **kwargs))


def patch(path, edit):
    """Edit a GGUF file in place through the reader's writable map (values of the same size only)."""
    reader = gguf.GGUFReader(path, "r+")
    edit(reader)
    reader.data.flush()


def set_value(reader, key, value):
    reader.fields[key].parts[-1][...] = value


@pytest.mark.parametrize("edit, match", [
    (lambda r: set_value(r, "general.architecture", np.frombuffer(b"gemma", np.uint8)),
     r"architecture 'gemma' is not supported; only 'llama'"),
    (lambda r: set_value(r, "llama.feed_forward_length", 512),
     r"tensor blk.0.ffn_gate.weight \(layers.0.feed_forward.w1.weight\) has shape \(256, 64\), the model its metadata "
     r"describes expects \(512, 64\)"),
    (lambda r: set_value(r, "llama.attention.head_count", 3), r"dim=64 is not divisible by n_heads=3"),
    (lambda r: set_value(r, "llama.rope.dimension_count", 8), r"rope.dimension_count is 8, but .* = 16"),
    (lambda r: set_value(r, "llama.attention.layer_norm_rms_epsilon", np.float32("nan")),
     r"layer_norm_rms_epsilon must be"),
    (lambda r: set_value(r, "llama.block_count", 3),
     r"missing tensor\(s\) \['blk.2.attn_q.weight', .* of the 3-layer model its metadata describes"),
    (lambda r: r.tensors[3].field.parts[1].__setitem__(Ellipsis, np.frombuffer(b"blk.0.attn_x.weight", np.uint8)),
     r"unexpected tensor\(s\) \['blk.0.attn_x.weight'\]"),
])
def test_bad_metadata_and_tensors_are_named(tmp_path, edit, match):
    path = small_file(tmp_path)
    patch(path, edit)
    with pytest.raises(ValueError, match=match) as e:
        load_model(path, device="cpu")
    assert path in str(e.value)


def test_unsupported_and_unknown_tensor_types_are_named(tmp_path):
    path = small_file(tmp_path, tensor_type="Q4_0")
    patch(path, lambda r: r.tensors[2].field.parts[4].__setitem__(0, int(gguf.GGMLQuantizationType.IQ4_NL)))
    with pytest.raises(ValueError, match=r"has type IQ4_NL, which this library cannot read; supported: F32, F16, BF16"):
        load_model(path, device="cpu")
    patch(path, lambda r: r.tensors[2].field.parts[4].__setitem__(0, 99))
    with pytest.raises(ValueError, match=r"a tensor has type 99, which the gguf package does not know .* F32, F16"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("metadata, match", [
    ({"llama.expert_count": 8}, r"expert_count is 8: mixture-of-experts"),
    ({"llama.rope.scaling.type": "linear"}, r"rope.scaling.type is 'linear'; only plain RoPE"),
    ({"split.count": 3}, r"one of 3 split GGUF files; merge them"),
    ({"llama.vocab_size": 301}, r"vocab_size is 301, but token_embd.weight has 300 rows"),
    ({"llama.embedding_length": "64"}, r"metadata llama.embedding_length is STRING, expected int"),
])
def test_unsupported_models_are_refused(tmp_path, metadata, match):
    with pytest.raises(ValueError, match=match):
        load_model(small_file(tmp_path, metadata=metadata), device="cpu")


def test_a_gguf_file_is_known_by_its_bytes_not_its_name(tmp_path):
    """Ollama's blobs are GGUF files named by their hash."""
    blob = tmp_path / "sha256-5a7c1d"
    shutil.copyfile(small_file(tmp_path), blob)
    assert open_checkpoint(blob).args == SMALL


def test_missing_truncated_and_foreign_files(tmp_path):
    state = random_state_dict(SMALL, seed=2)
    del state["layers.1.feed_forward.w3.weight"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['blk.1.ffn_up.weight'\]"):
        load_model(small_file(tmp_path, state=state), device="cpu")
    whole = small_file(tmp_path, "whole.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(whole, "rb").read()[:-5000])
    with pytest.raises(ValueError, match=r"cut.gguf is not a GGUF file this library can read \(truncated"):
        load_model(cut, device="cpu")
    (tmp_path / "page.gguf").write_text("<html>Not Found</html>")
    with pytest.raises(ValueError, match=r"page.gguf is not a GGUF file: it starts with b'<htm'"):
        load_model(tmp_path / "page.gguf", device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(FileNotFoundError, match=r"is a file, not a checkpoint directory .* or a .gguf file"):
        load_model(tmp_path / "weights.bin", device="cpu")


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path, monkeypatch):
    path = small_file(tmp_path)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"needs the gguf package: pip install -e '.\[gguf\]'"):
        load_model(path, device="cpu")


# ----------------------------------------------------------------------------- a trained model, and llama.cpp
@pytest.fixture(scope="module")
def stories(work):
    """stories260K (a trained Llama with GQA) as an F32 GGUF file, and its published greedy output."""
    meta_dir = shared_path("stories260K", "meta")
    expected = json.loads((meta_dir.parent / "expected.json").read_text())
    source = open_checkpoint(meta_dir)
    path = write_gguf(work / "stories.gguf", {k: t.load() for k, t in source.tensors.items()}, source.args,
                      tokenizer_path=str(meta_dir / "tokenizer.model"), context=512)
    return str(path), expected


def greedy(where, n):
    llama = Llama.build(where, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32")
    return llama.generate([[1]], max_gen_len=n, temperature=0)[0][0]


def test_a_trained_model_reproduces_its_published_greedy_output(stories):
    path, expected = stories
    assert greedy(path, 100) == expected["greedy_ids"][:100]


def llama_cpp_dir():
    """llama.cpp's source tree with its build (``LLAMA_CPP_DIR``), for its converter and quantizer; else skip."""
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root or not os.path.isfile(os.path.join(root, "convert_hf_to_gguf.py")):
        pytest.skip("llama.cpp not found: set LLAMA_CPP_DIR to its source tree (with convert_hf_to_gguf.py)")
    return root


def test_llama_cpp_converter_output_loads(tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py, from the HF layout (it permutes q/k back itself): same greedy output."""
    root = llama_cpp_dir()
    hf_dir = shared_path("stories260K", "hf")
    expected = json.loads((hf_dir.parent / "expected.json").read_text())
    shutil.copytree(hf_dir, tmp_path / "hf")
    out = tmp_path / "stories-f32.gguf"
    r = subprocess.run([sys.executable, os.path.join(root, "convert_hf_to_gguf.py"), str(tmp_path / "hf"),
                        "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert greedy(str(out), 200) == expected["greedy_ids"]


def llama_cpp_python():
    """llama-cpp-python (a peer, never a dependency; LLAMA_CPP_LIB_PATH may name its libllama), or skip."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or installed without a loadable libllama
        pytest.skip(f"llama-cpp-python is not usable (a peer, never a dependency): {e}")
    return llama_cpp


def test_llama_cpp_generates_our_greedy_tokens(stories):
    """llama.cpp (through llama-cpp-python) on the same F32 file: the same 64 greedy tokens."""
    llama_cpp = llama_cpp_python()
    path, _ = stories
    llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, verbose=False)
    theirs = [t for _, t in zip(range(64), llm.generate([1], top_k=1, temp=0.0, repeat_penalty=1.0))]
    assert greedy(path, 64) == theirs


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_1", "Q5_0"])
def test_llama_cpp_quantized_files_load(files, tmp_path, kind):
    """Files quantized by llama.cpp itself (its mixes: Q4_K_M keeps some layers in Q6_K, Q4_0 its output layer)
    load as the values the gguf package reads from them."""
    llama_cpp = llama_cpp_python()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    path = str(tmp_path / f"{kind}.gguf")
    assert llama_cpp.llama_model_quantize(files("F32").encode(), path.encode(), params) == 0
    values = file_values(path)
    model = load_model(path, device="cpu", dtype="fp32", optimize=False)
    for key, tensor in values.items():
        assert torch.equal(weight_of(model.get_submodule(key.removesuffix(".weight"))), tensor), key
