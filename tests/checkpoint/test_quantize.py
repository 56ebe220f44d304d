"""Weight-only int8 / int4 quantization: the arithmetic, the module swap, loading, saving and generating.

Error bounds are stated against the fp32 model with the same random weights (``helpers.CONFIGS``), and
against the bundled model for greedy agreement; kernels are checked against references in float64.
"""

import os
import subprocess
import sys

import pytest
import torch

from codellama import Llama, ModelArgs, Tokenizer, load_model
from codellama.checkpoint import BUNDLED_CKPT_DIR
from codellama.formats import open_checkpoint
from codellama.cpu import int4_linear, int8_linear, optimize_for_cpu, pack_int4
from codellama.cli.quantize import main
from codellama.quantize import (DEFAULT_GROUP_SIZE, Int4Linear, Int8Linear, QuantConfig, QuantizedEmbedding,
                                dequantize_int4, dequantize_int8, pack_int4 as pack_codes, parse_quantize,
                                quantize_int4, quantize_int8, quantize_model, unpack_int4)
from codellama.save import quantize_checkpoint

from conftest import ROOT
from helpers import CONFIGS, random_model

ARGS = CONFIGS["gqa"]  # dim 96, hidden 256: whole groups of 32, a padded last group at 64 and 128
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))


def logits(model, tokens=TOKENS):
    model.clear_cache()
    with torch.inference_mode():
        return model(tokens)


def quantized(config, seed=1, dtype=torch.float32, optimize=True):
    model = quantize_model(random_model(ARGS, seed=seed, dtype=dtype), config)
    return optimize_for_cpu(model) if optimize else model


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs,message", [
    (dict(scheme="int3"), r"unknown quantization scheme 'int3'; valid: int8, int4"),
    (dict(scheme="int4", group_size=48), r"group_size must be one of 32, 64, 128, got 48"),
    (dict(scheme="int8", group_size=32), r"group_size applies to int4 only"),
    (dict(scheme="int4", include_output="yes"), r"include_output must be True or False"),
    (dict(scheme="int4", output_scheme="int8"), r"output_scheme='int8' needs include_output=True"),
    (dict(scheme="int4", include_output=True, output_scheme="fp8"), r"unknown output_scheme 'fp8'; valid: int8, int4"),
    (dict(scheme="int8", group_size=32, include_output=True, output_scheme="int8"), r"group_size applies to int4 only"),
])
def test_bad_options_name_the_option_and_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_quantize_argument_accepts_a_name_or_a_config_and_nothing_else(tmp_path):
    assert parse_quantize("int4") == QuantConfig("int4", DEFAULT_GROUP_SIZE) and parse_quantize(None) is None
    with pytest.raises(ValueError, match=r"quantize must be None, one of 'int8', 'int4' or a QuantConfig, got 8"):
        parse_quantize(8)
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'int2'"):
        load_model(device="cpu", quantize="int2")
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'fp8'"):
        Llama.build(BUNDLED_CKPT_DIR, None, 32, 1, device="cpu", quantize="fp8")


# ----------------------------------------------------------------------------- the arithmetic
def test_int8_codes_are_within_half_a_step_and_zero_rows_stay_zero():
    w = torch.randn(40, 70, generator=torch.Generator().manual_seed(1))
    w[3] = 0
    q, scales = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (40,)
    assert int(q.abs().max()) == 127 and torch.equal(q[3], torch.zeros_like(q[3])) and scales[3] == 0
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group_size,in_features", [(32, 96), (64, 96), (128, 300)])
def test_int4_codes_are_within_half_a_step_per_group(group_size, in_features):
    w = torch.randn(24, in_features, generator=torch.Generator().manual_seed(2)) * 3
    packed, scales, zeros = quantize_int4(w, group_size, torch.float32)
    groups = -(-in_features // group_size)  # a ragged last group is padded
    assert packed.dtype == torch.uint8 and packed.shape == (24, groups * group_size // 2)
    assert scales.shape == zeros.shape == (24, groups)
    err = (dequantize_int4(packed, scales, zeros)[:, :in_features] - w).abs()
    step = scales.repeat_interleave(group_size, dim=1)[:, :in_features]
    assert (err <= step / 2 + 1e-5).all()


def test_int4_nibbles_hold_the_two_halves_of_each_group():
    codes = torch.randint(0, 16, (5, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    packed = pack_codes(codes, 32)
    assert torch.equal(packed[:, :16] & 15, codes[:, :16]) and torch.equal(packed[:, :16] >> 4, codes[:, 16:32])
    assert torch.equal(unpack_int4(packed, 32), codes)


# ----------------------------------------------------------------------------- the module swap
def test_quantized_state_dict_holds_codes_and_scales_under_meta_names():
    model = quantized(QuantConfig("int4", 32, include_embeddings=True))
    state = model.state_dict()
    assert state["layers.0.attention.wq.weight"].dtype == torch.uint8
    assert state["layers.0.attention.wq.weight"].shape == (ARGS.dim, ARGS.dim // 2)
    assert state["layers.0.attention.wq.scales"].shape == state["layers.0.attention.wq.zeros"].shape == (ARGS.dim, 3)
    assert state["tok_embeddings.weight"].shape == (ARGS.vocab_size, ARGS.dim // 2)
    assert state["output.weight"].dtype == torch.float32  # left in full precision by default
    assert not any("wqkv" in k or "w13" in k or "cpu_" in k for k in state)  # fused and packed, names unchanged
    int8 = quantized(QuantConfig("int8", include_output=True)).state_dict()
    assert int8["output.weight"].dtype == torch.int8 and int8["output.scales"].shape == (ARGS.vocab_size,)
    assert int8["layers.2.feed_forward.w2.scales"].shape == (ARGS.dim,)
    mixed = quantized(QuantConfig("int4", 32, include_output=True, output_scheme="int8"))
    assert isinstance(mixed.output, Int8Linear) and isinstance(mixed.layers[0].attention.wqkv, Int4Linear)
    state = mixed.state_dict()
    assert state["output.weight"].dtype == torch.int8 and "output.zeros" not in state
    assert state["layers.0.attention.wq.zeros"].shape == (ARGS.dim, 3)
    assert QuantConfig("int8", include_output=True, output_scheme="int8") == QuantConfig("int8", include_output=True)


@pytest.mark.parametrize("config", ["int8", QuantConfig("int4", 32), QuantConfig("int4", 128, include_output=True,
                                                                                  include_embeddings=True),
                                    QuantConfig("int4", 32, include_output=True, output_scheme="int8")])
def test_a_quantized_state_dict_loads_into_a_quantized_model_and_gives_the_same_logits(config):
    source = quantized(config, seed=3)
    target = quantized(config, seed=4)  # other values, same structure (fused, CPU-packed)
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(logits(target), logits(source), atol=0, rtol=0)


@pytest.mark.parametrize("config,bound", [("int8", 0.02), (QuantConfig("int4", 32), 0.25)])
def test_cpu_kernels_match_the_reference_path(config, bound):
    """The CPU kernels against the same codes through the dequantizing reference."""
    reference = logits(quantized(config, seed=5, optimize=False).float())
    fast = quantized(config, seed=5)
    ff = fast.layers[0].feed_forward
    layer = ff.w1 if ff.fused_sizes is None else ff.w13  # (int8 read in place is not fused)
    assert isinstance(layer, (Int8Linear, Int4Linear)) and (config == "int8" or layer.cpu_weight is not None)
    err = (logits(fast) - reference).abs().max()
    assert err < bound * reference.abs().max(), err


# Bounds on random weights (every weight a Gaussian: the hardest case for a few bits), 3 layers: (largest logit
# error over the largest logit, argmax agreement). Measured: bf16 0.02-0.03 / 0.97; int8 0.04-0.06 / 0.92-0.95;
# int4 g32 0.41-0.45 / 0.56-0.57 (min-max int4 of a Gaussian is off by 8% of σ per weight).
ERROR_BOUNDS = {"int8": (0.1, 0.85), "int4-g32": (0.7, 0.45)}


@pytest.mark.parametrize("name,config", [("int8", QuantConfig("int8")), ("int4-g32", QuantConfig("int4", 32))])
def test_logit_error_and_argmax_agreement_against_fp32(name, config):
    tokens = torch.randint(0, ARGS.vocab_size, (4, 64), generator=torch.Generator().manual_seed(6))
    expected = logits(random_model(ARGS, seed=6), tokens)
    got = logits(quantized(config, seed=6), tokens)
    max_err, agree = ERROR_BOUNDS[name]
    assert (got - expected).abs().max() < max_err * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > agree


def test_groups_that_do_not_divide_the_inputs_are_padded():
    layer = Int4Linear.from_float(torch.nn.Linear(100, 48, bias=False), QuantConfig("int4", 64))
    assert layer.weight.shape == (48, 64) and layer.scales.shape == (48, 2)
    x = torch.randn(3, 100)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, atol=1e-4, rtol=1e-4)


def test_embedding_lookup_dequantizes_only_its_rows():
    emb = torch.nn.Embedding(50, 96)
    for config in (QuantConfig("int8", include_embeddings=True), QuantConfig("int4", 32, include_embeddings=True)):
        q = QuantizedEmbedding.from_float(emb, config)
        tokens = torch.tensor([[3, 49, 0]])
        got = q(tokens)
        assert got.shape == (1, 3, 96)
        assert (got - emb(tokens)).abs().max() < 0.1 * emb.weight.abs().max()


# ----------------------------------------------------------------------------- CPU kernels
@pytest.mark.parametrize("K", [64, 29])  # 29: not a multiple of 16, the bf16 kernel's limit (fp32 path)
def test_int8_cpu_kernel_against_float64(K):
    w = torch.randn(37, K, generator=torch.Generator().manual_seed(7))
    q, s = quantize_int8(w, torch.float32)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(8))
    got = int8_linear(x, q, s)
    compute = torch.bfloat16 if K % 16 == 0 else torch.float32  # what the kernel multiplies in
    expected = x.to(compute).double() @ dequantize_int8(q, s.to(compute).double()).T
    assert got.shape == (2, 3, 37) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=1e-2)


def test_int4_cpu_kernel_against_float64_and_its_limits():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(9))
    packed, scales, zeros = quantize_int4(w, 32, torch.bfloat16)
    layout = pack_int4(unpack_int4(packed, 32), scales, zeros, 32)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(10))
    got = int4_linear(x, *layout, 32)
    expected = x.bfloat16().double() @ dequantize_int4(packed, scales.double(), zeros.double()).T
    torch.testing.assert_close(got.double(), expected, atol=5e-2, rtol=1e-2)
    assert pack_int4(unpack_int4(packed[:40], 32), scales[:40], zeros[:40], 32) is None  # rows not a multiple of 16


def test_avx2_only_cpu_runs_the_integer_kernels():
    """On an AVX2-only CPU (emulated) the packed integer kernels still run and agree with the reference."""
    code = ("import torch; from codellama import load_model; from codellama.cpu import bf16_packing_supported; "
            "assert not bf16_packing_supported(); t = torch.tensor([[1, 5, 9, 200, 17, 33]]); "
            "ref = load_model(device='cpu')(t); "
            "errs = [float((load_model(device='cpu', dtype=d, quantize=q)(t).float() - ref).abs().max()) "
            "for d in ('fp32', 'bf16') for q in ('int8', 'int4')]; "
            "print('ok', max(errs) / float(ref.abs().max()))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok") and float(r.stdout.split()[1]) < 0.25, r.stdout


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    """The bundled model quantized to int8 and int4 g32 (with output layer and embeddings), as the CLI writes them."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, argv in (("int8", ["--int8"]),
                       ("int4", ["--int4", "--group-size", "32", "--include-output", "--include-embeddings"])):
        assert main([BUNDLED_CKPT_DIR, str(root / name), *argv]) == 0
        out[name] = root / name
    return out


def test_quantized_checkpoint_records_its_scheme_and_loads_without_the_original(tiny_quantized, tmp_path):
    import json
    config = json.loads((tiny_quantized["int4"] / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "codellama", "scheme": "int4", "group_size": 32,
                                             "include_output": True, "include_embeddings": True}
    assert open_checkpoint(tiny_quantized["int8"]).quantization == QuantConfig("int8")
    source = open_checkpoint(tiny_quantized["int4"])
    assert source.tensors["tok_embeddings.weight"].dtype == torch.uint8
    size = sum(f.stat().st_size for f in tiny_quantized["int4"].glob("*.safetensors"))
    original = os.path.getsize(os.path.join(BUNDLED_CKPT_DIR, "consolidated.00.pth"))
    assert size < 0.4 * original  # bf16 → 4 bits and a scale and a zero per 32 weights
    # Quantizing on load in the checkpoint's dtype gives the same model, bit for bit.
    saved = load_model(tiny_quantized["int8"], device="cpu", dtype="bf16")
    on_load = load_model(device="cpu", dtype="bf16", quantize="int8")
    torch.testing.assert_close(logits(saved, TOKENS % 4096), logits(on_load, TOKENS % 4096), atol=0, rtol=0)


def test_an_int4_checkpoint_with_an_int8_output_layer_loads_as_quantizing_on_load(tmp_path):
    import json
    out = tmp_path / "mixed"
    assert main([BUNDLED_CKPT_DIR, str(out), "--int4", "--group-size", "32", "--output-scheme", "int8"]) == 0
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantConfig("int4", 32, include_output=True, output_scheme="int8")
    assert record == config.to_json() and record["output_scheme"] == "int8" and record["include_output"] is True
    assert open_checkpoint(out).quantization == config
    assert open_checkpoint(out).tensors["output.weight"].dtype == torch.int8
    saved = load_model(out, device="cpu", dtype="bf16")
    assert isinstance(saved.output, Int8Linear) and isinstance(saved.layers[0].feed_forward.w13, Int4Linear)
    on_load = load_model(device="cpu", dtype="bf16", quantize=config)
    torch.testing.assert_close(logits(saved, TOKENS % 4096), logits(on_load, TOKENS % 4096), atol=0, rtol=0)


def test_a_quantized_checkpoint_refuses_another_scheme_and_requantizing(tiny_quantized, tmp_path):
    with pytest.raises(ValueError, match=r"already quantized \(int8\); load it with quantize=None"):
        load_model(tiny_quantized["int8"], device="cpu", quantize="int4")
    load_model(tiny_quantized["int8"], device="cpu", quantize="int8")  # the same scheme is fine
    with pytest.raises(ValueError, match=r"already quantized \(int4 g32 \(\+ output layer, embeddings\)\)"):
        quantize_checkpoint(tiny_quantized["int4"], tmp_path / "again", "int8")
    assert not (tmp_path / "again").exists()


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([BUNDLED_CKPT_DIR, str(out), "--int8", "--group-size", "32"]) == 2
    assert "group_size applies to int4 only" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([BUNDLED_CKPT_DIR, str(out), "--int4"]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    r = subprocess.run([sys.executable, "-m", "codellama.quantize", BUNDLED_CKPT_DIR, str(tmp_path / "x"), "--int4",
                        "--group-size", "48"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "invalid choice: 48" in r.stderr and "RuntimeWarning" not in r.stderr


def test_int4_checkpoint_groups_must_not_straddle_tensor_parallel_ranks(tmp_path):
    from codellama.quantize import check_quantized_split
    check_quantized_split(ARGS, QuantConfig("int4", 32), 1)
    check_quantized_split(ModelArgs(dim=128, n_layers=1, n_heads=8, vocab_size=64, multiple_of=64),
                          QuantConfig("int4", 32), 2)  # 64 and 192 inputs a rank
    with pytest.raises(ValueError, match=r"across 2 ranks: wo \(48 inputs a rank\) would not be whole groups of 64"):
        check_quantized_split(ARGS, QuantConfig("int4", 64), 2)


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name,min_agreement", [("int8", 0.9), ("int4", 0.6)])
def test_generation_from_a_quantized_checkpoint_follows_the_full_precision_model(tiny_quantized, name,
                                                                                 min_agreement):
    """Greedy tokens of the bundled model from a quantized checkpoint against bf16, teacher-forced on bf16's
    64 tokens (so one early difference does not decide the rest)."""
    tok = Tokenizer(os.path.join(BUNDLED_CKPT_DIR, "tokenizer.model"))
    reference = Llama.build(BUNDLED_CKPT_DIR, None, 128, 1, device="cpu", dtype="bf16")
    prompt = tok.encode("def fibonacci(n):", bos=True, eos=False)
    tokens, _ = reference.generate([prompt], 64, temperature=0, stop_token=[])
    sequence = torch.tensor([tokens[0]])
    model = Llama.build(str(tiny_quantized[name]), None, 128, 1, device="cpu", dtype="bf16").model
    expected = logits(reference.model, sequence)[0, len(prompt) - 1:-1].argmax(-1)
    got = logits(model, sequence)[0, len(prompt) - 1:-1].argmax(-1)
    assert (got == expected).float().mean() >= min_agreement
    text = Llama(model, tok, 128, 1).text_completion(["def add(a, b):"], temperature=0, max_gen_len=8)
    assert isinstance(text[0]["generation"], str)


def test_examples_take_quantize_flags():
    r = subprocess.run([sys.executable, "example_completion.py", "--quantize", "int4", "--group_size", "32",
                        "--max_gen_len", "4", "--temperature", "0"], capture_output=True, text=True, cwd=ROOT,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "example_completion.py", "--group_size", "32"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --group_size 32: needs quantize int4 (it sets int4's group size)"
