"""The native CPU kernels (``codellama.cpu_kernels``: int4 tiles, int8 and bf16 rows): their layout, their arithmetic
against the PyTorch references and float64, their AVX2 paths, the layers that use them, and torch's kernels when
they cannot be built (switched off, or no compiler)."""

import os
import subprocess
import sys

import pytest
import torch

from codellama import cpu_kernels
from codellama.quantize import (LAYERS, QuantConfig, dequantize_int4, dequantize_int8, quantize_int4,
                                quantize_int8, quantize_model, unpack_int4)

from conftest import ROOT
from helpers import CONFIGS, random_model

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # torch's kernels and ours: AVX2 only


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with ``env`` added (the kernels choose their ISA once per process)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


native = pytest.mark.skipif(not cpu_kernels.available(), reason="the native int4/int8 kernels cannot be built here")
SCHEMES = [QuantConfig("int4", 32), QuantConfig("int8")]
schemes = pytest.mark.parametrize("config", SCHEMES, ids=lambda c: c.scheme)


def quantized_layer(config, in_features, out_features, dtype=torch.float32):
    return LAYERS[config.scheme].from_float(torch.nn.Linear(in_features, out_features, bias=False).to(dtype), config)


def weights(N, K, group_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 2  # rows of different scales
    return quantize_int4(w.to(dtype), group_size, dtype)


def bound(x, codes, scales, group_size):
    """|error| ≤ Σ_k |s·(q − 8)|·d/2: each activation is off by at most half its half group's step d = max|x|/127
    (the zeros multiply the exact sum of x, so they add nothing)."""
    H = group_size // 2
    xf = x.reshape(-1, x.shape[-1]).double()
    step = xf.view(xf.shape[0], -1, H).abs().amax(-1) / 127  # (M, K/H)
    q = unpack_int4(codes, group_size).double() - 8  # (N, K)
    w = (q.view(q.shape[0], -1, group_size) * scales.double().unsqueeze(-1)).abs().view(q.shape[0], -1, H).sum(-1)
    return (step / 2) @ w.T  # (M, N)


@native
@pytest.mark.parametrize("N, K, group_size", [(1, 32, 32), (17, 64, 32), (37, 192, 64), (100, 256, 128), (48, 128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_round_trip_and_the_kernel_matches_its_reference_and_float64(N, K, group_size, dtype):
    codes, scales, zeros = weights(N, K, group_size, dtype, seed=N + K)
    tiles, sz = cpu_kernels.int4_tiles(codes, scales, zeros, group_size)
    assert tiles.shape == (-(-N // 16), K // group_size, group_size // 8, 64)
    assert sz.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    for got, want in zip(cpu_kernels.untile_int4(tiles, sz, N, dtype), (codes, scales, zeros)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for M in (1, 3, 4, 9):  # 9: two full blocks of four rows and one left over
        x = torch.randn(2, M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        got = cpu_kernels.int4_tiles_linear(x, tiles, sz, group_size, N)
        assert got.shape == (2, M, N) and got.dtype == dtype
        ref = cpu_kernels.int4_tiles_reference(x.float(), tiles, sz, group_size, N)
        exact = (x.double() @ dequantize_int4(codes, scales.double(), zeros.double()).T).view(-1, N)
        scale = exact.abs().max().item()
        torch.testing.assert_close(got.float().view(-1, N), ref.view(-1, N), atol=1e-5 * scale + (
            0.01 * scale if dtype == torch.bfloat16 else 0), rtol=0)  # bf16 output: rounded once more
        err = (ref.double().view(-1, N) - exact).abs()
        assert (err <= bound(x, codes, scales, group_size) + 1e-5 * scale).all()


def int8_bound(x, codes, scales):
    """|error| ≤ Σ_k |s·q|·d/2: each activation is off by at most half its block's step d = max|x|/127."""
    K = x.shape[-1]
    xf = torch.nn.functional.pad(x.reshape(-1, K).double(), (0, -K % 32))
    step = xf.view(xf.shape[0], -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(xf.shape) / 127
    w_abs = torch.nn.functional.pad(dequantize_int8(codes, scales.double()).abs(), (0, -K % 32))
    return (step / 2) @ w_abs.T


@native
@pytest.mark.parametrize("N, K", [(1, 32), (17, 64), (37, 100), (100, 256), (48, 4096 + 8), (5, 31), (9, 288)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_kernel_matches_its_reference_and_float64(N, K, dtype):
    """Rows streamed in place (up to 8 rows of x) and tiles packed per call (more), inputs not a multiple of the
    block or of a 64-byte chunk (code 0 and zero activations past K), every code the format allows."""
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 2
    codes, scales = quantize_int8(w.to(dtype), dtype)
    codes[0, :4] = torch.tensor([-128, 127, -127, 0], dtype=torch.int8)[:K]
    exact_w = dequantize_int8(codes, scales.double())
    for M in (1, 3, 4, 5, 8, 9, 20):  # 8: the most rows streamed in place; 9 and 20: packed tiles
        x = torch.randn(2, M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        got = cpu_kernels.int8_rows_linear(x, codes, scales)
        assert got.shape == (2, M, N) and got.dtype == dtype
        ref = cpu_kernels.int8_rows_reference(x.float(), codes, scales)
        exact = (x.double() @ exact_w.T).view(-1, N)
        scale = exact.abs().max().item()
        torch.testing.assert_close(got.float().view(-1, N), ref.view(-1, N), atol=1e-5 * scale + (
            0.01 * scale if dtype == torch.bfloat16 else 0), rtol=0)  # bf16 output: rounded once more
        err = (ref.double().view(-1, N) - exact).abs()
        assert (err <= int8_bound(x, codes, scales) + 1e-5 * scale).all()


@native
def test_the_int8_kernel_reads_codes_where_they_lie():
    """Codes at any byte offset and with any row stride (a view of a file's mapping, a slice of a wider tensor)
    give the bits of a contiguous copy; what the kernel cannot read is refused with the reason."""
    wide = torch.randint(-128, 128, (40, 301), dtype=torch.int8)
    codes = wide[:, 7:207]  # rows of 200 contiguous codes, 301 apart, the first at an odd offset
    scales = torch.rand(40)
    for M in (3, 12):
        x = torch.randn(M, 200)
        assert torch.equal(cpu_kernels.int8_rows_linear(x, codes, scales),
                           cpu_kernels.int8_rows_linear(x, codes.contiguous(), scales))
    ops, isa = torch.ops.codellama_native, cpu_kernels.native_isa("int8")
    with pytest.raises(RuntimeError, match=r"w must be \(N, K\) int8 with contiguous rows"):
        ops.int8_rows_linear(torch.randn(2, 40), wide[:, :40].T.contiguous().T, scales, isa)
    with pytest.raises(RuntimeError, match="x has 64 inputs, w 200"):
        ops.int8_rows_linear(torch.randn(2, 64), codes, scales, isa)
    with pytest.raises(RuntimeError, match=r"scales must be contiguous \(40,\)"):
        ops.int8_rows_linear(torch.randn(2, 200), codes, scales[:39], isa)


def awkward_weights(dtype):
    """Rows of different scales, a row of zeros, values on rounding ties, (fp32) a row whose scale is subnormal."""
    w = torch.randn(40, 301, generator=torch.Generator().manual_seed(7)) * torch.rand(40, 1) * 3
    w[3] = 0
    w[5, :5] = torch.tensor([127 * 0.5, -0.5, 1.5, 2.5, -2.5])  # with scale 0.5: ties 0.5 apart
    if dtype == torch.float32:
        w[7] *= 1e-39
    return w.to(dtype)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_native_int8_quantizer_gives_quantize_int8s_codes_bit_for_bit(dtype):
    """quantize_weight takes it on CPU (one pass, no float32 temporaries); the codes and scales must be exactly
    those of the PyTorch arithmetic, or a checkpoint quantized on another machine would differ."""
    from codellama.quantize import quantize_weight
    w = awkward_weights(dtype)
    want = quantize_int8(w, dtype)
    for weight in (w, torch.cat([w, w], 1)[:, 7:308]):  # contiguous, and rows with a stride
        got = cpu_kernels.quantize_int8(weight)
        assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got, quantize_int8(weight, dtype)))
    got = quantize_weight(w, QuantConfig("int8"))
    assert torch.equal(got["weight"], want[0]) and torch.equal(got["scales"], want[1])


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_the_native_int4_quantizer_gives_quantize_int4s_codes_bit_for_bit(dtype, group_size):
    from codellama.quantize import quantize_weight
    w = torch.cat([awkward_weights(dtype)[:, :256], torch.full((40, 128), 1.5, dtype=dtype)], 1)  # constant groups
    w[9, :group_size] = (torch.arange(group_size) * 0.25).to(dtype)  # codes on ties
    for weight in (w, torch.cat([w, w], 1)[:, 5:389]):
        got = cpu_kernels.quantize_int4(weight, group_size)
        want = quantize_int4(weight, group_size, dtype)
        assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got, want))
    got = quantize_weight(w, QuantConfig("int4", group_size))
    assert all(torch.equal(got[name], e) for name, e in zip(("weight", "scales", "zeros"),
                                                            quantize_int4(w, group_size, dtype)))
    odd = w[:, :300]  # a last group padded: PyTorch's quantizer, the same function's codes
    assert all(torch.equal(got, want) for got, want in zip(quantize_weight(odd, QuantConfig("int4", group_size)).values(),
                                                          quantize_int4(odd, group_size, dtype)))


@native
@schemes
def test_the_kernel_reads_the_inputs_padding_and_odd_rows(config):
    """An input size that is not a multiple of the group or block (padded with zero activations) and rows left over."""
    layer = quantized_layer(config, 100, 37)
    x = torch.randn(3, 100)
    want = x.double() @ layer.dequantize(torch.float64).T
    codes = layer.weight
    layer.to_cpu_layout()
    if config.scheme == "int4":
        assert layer.tiled is not None and layer.weight is None  # the tiles hold the only copy
    else:
        assert layer.weight is codes and layer.cpu_weight is None  # read where it lies
    got = layer(x)
    assert got.shape == (3, 37)
    assert (got.double() - want).abs().max() < 0.02 * want.abs().max()


@native
def test_a_tiled_layer_gives_its_codes_back_exactly_and_moves():
    config = QuantConfig("int4", 32)
    layer = quantized_layer(config, 96, 48, torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    want = layer.dequantize()
    layer.to_cpu_layout()
    layer.to_cpu_layout()  # a second call leaves it alone
    assert layer.weight is None and layer.cpu_weight is not None and "CPU tiles" in repr(layer)
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(layer.dequantize(), want)
    other = quantized_layer(config, 96, 48, torch.bfloat16)
    other.to_cpu_layout()
    other.load_state_dict(before)  # into a tiled layer: tiled again, with the new codes
    assert other.tiled is not None and all(torch.equal(other.state_dict()[k], before[k]) for k in before)
    layer.float()  # cast: the canonical codes again (laid out again by cpu_layout)
    assert layer.tiled is None and layer.weight is not None and layer.scales.dtype == torch.float32


@native
def test_a_load_of_other_layers_leaves_a_tiled_layer_as_it_is():
    """The loader fills the model a layer at a time (``load_state_dict(strict=False)`` over the whole model): a
    tiled layer whose tensors are not in the dict keeps its tiles (re-tiling every layer on every call made
    loading quadratic in depth: 66 s for a pre-quantized 7B); a strict load still names its keys missing."""
    layer = quantized_layer(QuantConfig("int4", 32), 64, 32)
    layer.to_cpu_layout()
    tiles = layer.cpu_weight
    result = layer.load_state_dict({}, strict=False)
    assert layer.cpu_weight is tiles and layer.weight is None
    assert result.missing_keys == list(layer.TENSORS)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({})


@native
@schemes
def test_a_compiled_step_calls_the_kernel(config):
    layer = quantized_layer(config, 64, 40)
    layer.to_cpu_layout()
    x = torch.randn(1, 1, 64)
    compiled = torch.compile(layer, dynamic=False)
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=1e-6)


@native
@schemes
def test_a_model_on_the_kernel_stays_within_the_quantized_error_of_the_reference(config):
    """Whole-model logits: the native kernel against the same codes through the dequantizing reference."""
    from codellama.cpu import optimize_for_cpu
    args = CONFIGS["gqa"]
    tokens = torch.randint(0, args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    reference = quantize_model(random_model(args, seed=5), config)(tokens)
    fast = optimize_for_cpu(quantize_model(random_model(args, seed=5), config))
    if config.scheme == "int4":
        assert fast.layers[0].feed_forward.w13.tiled is not None
    else:  # read where they lie: not fused (fusing would copy them)
        assert fast.layers[0].feed_forward.fused_sizes is None and fast.layers[0].attention.fused_sizes is None
    got = fast(tokens)
    assert (got - reference).abs().max() < 0.02 * reference.abs().max()


@native
def test_int8_rows_are_independent_of_the_batch():
    """A row's output is the same bits alone or among up to 8 rows (greedy decoding at batch 1 and in a batch
    agree), and among any number of rows above 8 (prefill chunks)."""
    layer = quantized_layer(QuantConfig("int8"), 200, 70)
    layer.to_cpu_layout()
    x = torch.randn(20, 200)
    together = layer(x[:8])
    assert all(torch.equal(layer(x[i:i + 1]), together[i:i + 1]) for i in range(8))
    many = layer(x)
    assert all(torch.equal(layer(x[:n]), many[:n]) for n in (9, 13))


@native
def test_the_kernels_give_the_same_bits_on_any_number_of_threads():
    """The threads take rows from a shared counter, in whatever order they get to it: each row's arithmetic is
    its own, so one thread and two give the same bits (and so do two calls)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 256, generator=g).to(torch.bfloat16)
    tiles4, sz = cpu_kernels.int4_tiles(*quantize_int4(w, 32, torch.bfloat16), 32)
    codes8, scales8 = quantize_int8(w, torch.bfloat16)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    x12 = torch.randn(12, 256, generator=g).to(torch.bfloat16)
    products = [lambda: cpu_kernels.int4_tiles_linear(x, tiles4, sz, 32, 300),
                lambda: cpu_kernels.int8_rows_linear(x, codes8, scales8),
                lambda: cpu_kernels.int8_rows_linear(x12, codes8, scales8),
                lambda: cpu_kernels.bf16_rows_linear(x, w)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [f() for f in products]
        torch.set_num_threads(max(2, threads))
        for f, want in zip(products, alone):
            assert torch.equal(f(), want) and torch.equal(f(), want)
    finally:
        torch.set_num_threads(threads)


AVX2_CHECK = """
import torch
from codellama import cpu_kernels
from codellama.quantize import quantize_int4, quantize_int8
assert cpu_kernels.available() and cpu_kernels.isa() == cpu_kernels.isa("int8") == "AVX2", cpu_kernels.isa()
codes, scales, zeros = quantize_int4(torch.randn(37, 192), 64, torch.bfloat16)
tiles, sz = cpu_kernels.int4_tiles(codes, scales, zeros, 64)
x = torch.randn(5, 192)
got = cpu_kernels.int4_tiles_linear(x, tiles, sz, 64, 37)
ref = cpu_kernels.int4_tiles_reference(x, tiles, sz, 64, 37)
codes8, scales8 = quantize_int8(torch.randn(37, 200), torch.bfloat16)
codes8[0, :3] = torch.tensor([-128, 127, -127], dtype=torch.int8)
errors = [float((got - ref).abs().max() / ref.abs().max())]
for rows in (5, 12):  # streamed in place, packed tiles
    x8 = torch.randn(rows, 200)
    got8 = cpu_kernels.int8_rows_linear(x8, codes8, scales8)
    ref8 = cpu_kernels.int8_rows_reference(x8, codes8, scales8)
    errors.append(float((got8 - ref8).abs().max() / ref8.abs().max()))
from codellama.quantize import quantize_int8 as reference_quantizer
from codellama.quantize import quantize_int4 as reference_int4
for dtype in (torch.float32, torch.bfloat16):
    w = (torch.randn(20, 256) * torch.rand(20, 1)).to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(cpu_kernels.quantize_int8(w), reference_quantizer(w, dtype)))
    assert all(torch.equal(a, b) for a, b in zip(cpu_kernels.quantize_int4(w, 64), reference_int4(w, 64, dtype)))
print("ok", *errors)
"""


@native
def test_the_avx2_path_computes_the_same():
    r = run_python(AVX2_CHECK, **AVX2)
    assert r.stdout.startswith("ok") and all(float(e) < 1e-5 for e in r.stdout.split()[1:]), r.stdout


FALLBACK_CHECK = """
import torch
from codellama.quantize import Int4Linear, Int8Linear, QuantConfig
layer = Int4Linear.from_float(torch.nn.Linear(64, 32, bias=False), QuantConfig("int4", 32))
layer8 = Int8Linear.from_float(torch.nn.Linear(64, 32, bias=False), QuantConfig("int8"))
x = torch.randn(2, 64)
want, want8 = x @ layer.dequantize().T, x @ layer8.dequantize().T
layer.to_cpu_layout()
layer8.to_cpu_layout()
assert layer.tiled is None and layer.cpu_weight is not None  # torch's packed kernel
assert layer8.tiled is None and layer8.weight is not None  # torch's kernel on the codes
print("ok", max(float((layer(x) - want).abs().max() / want.abs().max()),
                float((layer8(x) - want8).abs().max() / want8.abs().max())))
layer.to_cpu_layout()
"""


@pytest.mark.parametrize("why", ["disabled", "no compiler"])
def test_without_the_native_kernel_int4_and_int8_layers_take_torchs_and_say_why_once(tmp_path, why):
    """Switched off, or no C++ compiler on the machine (and nothing cached): torch's kernel, one line saying why."""
    if why == "disabled":
        env = {cpu_kernels.DISABLE_ENV: "0"}
        reason = f"{cpu_kernels.DISABLE_ENV}=0"
    else:
        env = {"CXX": str(tmp_path / "no-such-g++"), cpu_kernels.CACHE_ENV: str(tmp_path / "cache")}
        reason = "building them failed ("
    r = run_python(FALLBACK_CHECK, **env)
    assert r.stdout.startswith("ok") and float(r.stdout.split()[1]) < 0.02
    lines = [line for line in r.stderr.splitlines() if "native CPU kernels" in line]
    assert len(lines) == 1 and lines[0].startswith(f"codellama: the native CPU kernels are unavailable ({reason}")
    assert lines[0].endswith("int4, int8 and bf16 layers use torch's")


def test_a_compiler_that_fails_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """A broken build (here: a compiler that does not exist) leaves the kernels unavailable, with the reason."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(OSError):
        cpu_kernels._library_path()
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left in the cache


# ----------------------------------------------------------------------------- bf16 rows
native_bf16 = pytest.mark.skipif(not cpu_kernels.available("bf16"), reason="the native bf16 kernel cannot be built here")


def bf16_bound(x, weight):
    """|error| of float32 sums of exact bf16 products: ≤ K·2⁻²³·Σ|x||w| (a generous form of the usual γ_K bound)."""
    K = x.shape[-1]
    return K * 2.0 ** -23 * (x.reshape(-1, K).to(torch.bfloat16).double().abs() @ weight.double().abs().T)


@native_bf16
@pytest.mark.parametrize("N, K", [(1, 32), (7, 64), (37, 100), (64, 4096 + 8), (5, 3)])
def test_the_bf16_row_kernel_matches_its_reference_and_float64(N, K):
    g = torch.Generator().manual_seed(N * K)
    weight = (torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)).to(torch.bfloat16)
    for M in (1, 2, 3, 4, 5, 9):  # every block height, and rows left over
        x = torch.randn(M, K, generator=g)
        got = cpu_kernels.bf16_rows_linear(x, weight)
        assert got.shape == (M, N) and got.dtype == torch.float32
        want = cpu_kernels.bf16_rows_reference(x.double(), weight)  # float64 sums of the same bf16 values
        assert ((got.double() - want).abs() <= bf16_bound(x, weight) + 1e-30).all()
    xb = torch.randn(2, 1, K, generator=g).to(torch.bfloat16)  # bf16 in, bf16 out, any leading shape
    got = cpu_kernels.bf16_rows_linear(xb, weight)
    assert got.shape == (2, 1, N) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, cpu_kernels.bf16_rows_reference(xb, weight), atol=1e-6, rtol=2 ** -7)


@native_bf16
def test_the_bf16_row_kernels_read_orders_give_the_same_bits():
    """One activation row reads one weight row at a time on AVX-512 (one memory stream a thread), more rows read
    four side by side: every output's arithmetic is the same, so the two orders must agree bit for bit."""
    kernel, isa = torch.ops.codellama_native.bf16_rows_linear, cpu_kernels.native_isa("bf16")
    g = torch.Generator().manual_seed(0)
    for N, K in [(1, 32), (7, 100), (131, 4096 + 40), (64, 3)]:  # rows not a multiple of four; inputs left over
        w = torch.randn(N, K, generator=g).to(torch.bfloat16)
        x = torch.randn(1, K, generator=g).to(torch.bfloat16)
        chosen = kernel(x, w, isa, 0)
        assert torch.equal(chosen, kernel(x, w, isa, 4))
        assert torch.equal(chosen, cpu_kernels.bf16_rows_linear(x.float(), w))
        if isa == 2:  # one weight row at a time, also over a row stride with NaN just past each row's end
            wide = torch.full((N, K + 40), float("nan"), dtype=torch.bfloat16)
            wide[:, :K] = w
            assert torch.equal(kernel(x, w, isa, 1), chosen) and torch.equal(kernel(x, wide[:, :K], isa, 1), chosen)
    with pytest.raises(RuntimeError, match=r"rows_a_step must be 0 \(chosen\), 4, or 1 \(AVX-512 BF16 with one row"):
        kernel(torch.randn(2, 32).to(torch.bfloat16), torch.randn(4, 32).to(torch.bfloat16), isa, 1)
    with pytest.raises(RuntimeError, match="rows_a_step must be"):
        kernel(torch.randn(1, 32).to(torch.bfloat16), torch.randn(4, 32).to(torch.bfloat16), isa, 3)


@native_bf16
def test_the_bf16_row_kernel_rounds_bf16_outputs_as_torch_does():
    """A bf16 model's layers take the kernel's sums in bf16, rounded in the kernel: the bits of .to(bf16)."""
    kernel, isa = torch.ops.codellama_native.bf16_rows_linear, cpu_kernels.native_isa("bf16")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(67, 100, generator=g).to(torch.bfloat16)
    w[3, 5], w[4, :2] = float("inf"), torch.tensor([float("inf"), -float("inf")])  # inf and NaN sums
    for M in (1, 3, 6):
        x = torch.randn(M, 100, generator=g).to(torch.bfloat16)
        want = kernel(x, w, isa).to(torch.bfloat16)
        got = kernel(x, w, isa, 0, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
        assert torch.equal(got[~got.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    with pytest.raises(RuntimeError, match="out_dtype must be float32 or bfloat16, not Half"):
        kernel(x, w, isa, 0, torch.float16)


@native_bf16
def test_the_bf16_row_kernel_reads_a_weight_with_a_row_stride_in_place():
    """A weight whose rows are contiguous but spaced (a slice of a wider tensor, as a fused or mapped one is)."""
    wide = torch.randn(12, 80).to(torch.bfloat16)
    weight = wide[:, 8:72]  # (12, 64), row stride 80
    for M in (1, 3):
        x = torch.randn(M, 64)
        got = cpu_kernels.bf16_rows_linear(x, weight)
        want = cpu_kernels.bf16_rows_reference(x.double(), weight.contiguous())
        assert ((got.double() - want).abs() <= bf16_bound(x, weight) + 1e-30).all()


@native_bf16
def test_the_bf16_row_kernel_refuses_what_it_cannot_read():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"w must be \(N, K\) bf16 with contiguous rows"):
        cpu_kernels.bf16_rows_linear(x, torch.randn(8, 64))  # float32 weight
    with pytest.raises(RuntimeError, match=r"w must be \(N, K\) bf16 with contiguous rows"):
        cpu_kernels.bf16_rows_linear(x, torch.randn(64, 8).to(torch.bfloat16).T)  # columns contiguous
    with pytest.raises(RuntimeError, match="x has 64 inputs, w 32"):
        cpu_kernels.bf16_rows_linear(x, torch.randn(8, 32).to(torch.bfloat16))


@native_bf16
def test_bf16_all_finite_finds_any_nan_or_infinity():
    t = torch.randn(100_000).to(torch.bfloat16)
    assert cpu_kernels.bf16_all_finite(t)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[77_777] = bad
        assert not cpu_kernels.bf16_all_finite(u)
    assert cpu_kernels.bf16_all_finite(torch.tensor([3.3e38, -3.3e38, 1e-40]).to(torch.bfloat16))  # large, subnormal


@native_bf16
def test_an_in_place_bf16_model_decodes_as_the_plain_one():
    """optimize_for_cpu keeps bf16 weights in place (RowsLinear): a few rows take the kernel, more take F.linear;
    greedy tokens and logits as the plain bf16 model's within bf16's rounding."""
    from codellama.cpu import RowsLinear, optimize_for_cpu
    args = CONFIGS["gqa"]
    plain = random_model(args, seed=3, dtype=torch.bfloat16)
    fast = optimize_for_cpu(random_model(args, seed=3, dtype=torch.bfloat16))
    assert isinstance(fast.layers[0].attention.wq, RowsLinear) and isinstance(fast.output, RowsLinear)
    for rows in (1, 3, 12):
        tokens = torch.randint(0, args.vocab_size, (1, rows), generator=torch.Generator().manual_seed(rows))
        want, got = plain(tokens).float(), fast(tokens).float()
        assert (got - want).abs().max() < 0.05 * want.abs().max()


# ----------------------------------------------------------------------------- native attention (decode, prefill)
native_attention = pytest.mark.skipif(cpu_kernels.native_isa("bf16") != 2,
                                      reason="the native attention kernels need AVX-512 (with BF16)")


def attention_float64(q, k, v, starts):
    """Row b's query t at position starts[b] + t over keys 0 .. starts[b] + t, grouped heads, in float64;
    also sum_l p_l |v_l| (rounding the probabilities to bf16 moves an output by at most 2^-8 of it)."""
    B, H, T, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    out, scale = torch.empty(B, H, T, hd, dtype=torch.float64), torch.empty(B, H, T, hd, dtype=torch.float64)
    for b in range(B):
        qb = q[b].double().reshape(Hkv, H // Hkv, T, hd)
        s = torch.einsum("grtd,gld->grtl", qb, k[b].double()) * hd ** -0.5
        later = torch.arange(L).view(1, L) > (int(starts[b]) + torch.arange(T)).view(T, 1)  # (T, L)
        p = torch.softmax(s.masked_fill(later, float("-inf")), -1)
        out[b] = torch.einsum("grtl,gld->grtd", p, v[b].double()).reshape(H, T, hd)
        scale[b] = torch.einsum("grtl,gld->grtd", p, v[b].double().abs()).reshape(H, T, hd)
    return out, scale


@native_attention
@pytest.mark.parametrize("B, H, Hkv, hd", [(1, 32, 32, 128), (3, 8, 2, 64), (2, 4, 4, 16), (2, 6, 3, 32)])
def test_the_decode_attention_kernel_matches_float64(B, H, Hkv, hd):
    """Grouped heads, ragged rows (each its own length), the keys and values views of a longer cache."""
    g = torch.Generator().manual_seed(B * H + hd)
    cache = torch.randn(2, B, Hkv, 300, hd, generator=g).to(torch.bfloat16)
    q = (torch.randn(B, H, hd, generator=g) * 3).to(torch.bfloat16)
    lengths = torch.tensor([257 - 50 * b for b in range(B)])
    k, v = cache[0, :, :, :257], cache[1, :, :, :257]
    got = torch.ops.codellama_native.decode_attention_bf16(q, k, v, lengths, hd ** -0.5)
    assert got.dtype == torch.float32 and got.shape == (B, H, hd)
    want = attention_float64(q.unsqueeze(2), k, v, lengths - 1)[0].squeeze(2)  # one query at position length - 1
    assert (got.double() - want).abs().max() < 1e-5
    alone = [torch.ops.codellama_native.decode_attention_bf16(q[b:b + 1], k[b:b + 1], v[b:b + 1], lengths[b:b + 1],
                                                               hd ** -0.5) for b in range(B)]
    assert torch.equal(torch.cat(alone), got)  # a row's result is its own


@native_attention
def test_the_decode_attention_kernel_refuses_what_it_cannot_read():
    q, k = torch.randn(1, 4, 64).to(torch.bfloat16), torch.randn(1, 4, 9, 64).to(torch.bfloat16)
    op = torch.ops.codellama_native.decode_attention_bf16
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        op(q.float(), k, k, torch.tensor([9]), 0.1)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 10 is not in 1..9"):
        op(q, k, k, torch.tensor([10]), 0.1)
    with pytest.raises(RuntimeError, match="head size must be 16, 32, 64 or 128, not 8"):
        op(q[..., :8].contiguous(), k[..., :8].contiguous(), k[..., :8].contiguous(), torch.tensor([9]), 0.1)


@native_attention
def test_a_bf16_decode_step_attends_with_the_native_kernel_and_training_does_not():
    """TorchOps.attention for one query per row over a bf16 cache: the native kernel (no float32 copies), within
    float32 rounding of the copies' SDPA; with gradients wanted, the differentiable path."""
    from codellama import ops
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 64, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 40, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    start = torch.tensor([39, 20])
    assert ops._native_decode_attention(q, k, v, start) is not None
    got = ops.TorchOps.attention(q, k, v, start)
    want = ops.TorchOps.attention(q.float(), k.float(), v.float(), start)
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=0)  # (the bf16 output's rounding)
    past = torch.tensor([45, 0])  # a position past the cache's end sees every key, as the masked path does
    torch.testing.assert_close(ops.TorchOps.attention(q, k, v, past).float(),
                               ops.TorchOps.attention(q.float(), k.float(), v.float(), past), atol=1e-2, rtol=0)
    qg = q.clone().requires_grad_()
    assert ops._native_decode_attention(qg, k, v, start) is None
    ops.TorchOps.attention(qg, k, v, start).float().sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- prefill attention
@native_attention
@pytest.mark.parametrize("B, H, Hkv, hd, T, starts", [(1, 8, 8, 128, 100, [200]), (2, 4, 2, 64, 70, [0, 130]),
                                                       (1, 6, 3, 32, 33, [0]), (3, 4, 1, 64, 1, [5, 63, 64])])
def test_the_prefill_attention_kernel_matches_float64_and_gives_the_same_bits_in_any_chunks(B, H, Hkv, hd, T, starts):
    """Grouped heads, ragged rows, queries and keys as views (the model's transposed q, a longer cache); a
    chunk's queries split anyhow, or a row alone, give the same bits: a prompt cached in pieces is exact."""
    g = torch.Generator().manual_seed(B * H + hd + T)
    L = max(starts) + T + 7
    cache = torch.randn(2, B, Hkv, L + 9, hd, generator=g).to(torch.bfloat16)
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]
    q = (torch.randn(B, T, H, hd, generator=g) * 3).to(torch.bfloat16).transpose(1, 2)  # (B, H, T, hd) view
    starts = torch.tensor(starts)
    op = torch.ops.codellama_native.prefill_attention_bf16
    got = op(q, k, v, starts, hd ** -0.5)
    assert got.dtype == torch.float32 and got.shape == (B, H, T, hd)
    want, scale = attention_float64(q, k, v, starts)
    assert ((got.double() - want).abs() <= 2.0 ** -8 * scale + 1e-5).all()  # bf16 probabilities
    pieces = [op(q[:, :, t0:t0 + 17], k, v, starts + t0, hd ** -0.5) for t0 in range(0, T, 17)]
    assert torch.equal(torch.cat(pieces, 2), got)
    alone = [op(q[b:b + 1], k[b:b + 1], v[b:b + 1], starts[b:b + 1], hd ** -0.5) for b in range(B)]
    assert torch.equal(torch.cat(alone), got)
    for b in range(B):  # what an earlier request left past a row's last position stays out of it, NaN included
        k[b, :, int(starts[b]) + T:], v[b, :, int(starts[b]) + T:] = float("nan"), float("inf")
    assert torch.equal(op(q, k, v, starts, hd ** -0.5), got)


@native_attention
def test_the_prefill_attention_kernel_refuses_what_it_cannot_read():
    q, k = torch.randn(1, 4, 3, 64).to(torch.bfloat16), torch.randn(1, 4, 9, 64).to(torch.bfloat16)
    op = torch.ops.codellama_native.prefill_attention_bf16
    with pytest.raises(RuntimeError, match="q must be"):
        op(q.float(), k, k, torch.tensor([0]), 0.1)
    with pytest.raises(RuntimeError, match=r"starts\[0\] = 7: its queries' positions 7..9 need keys up to there, "
                                           "and there are 9"):
        op(q, k, k, torch.tensor([7]), 0.1)
    with pytest.raises(RuntimeError, match="head size must be 32, 64 or 128, not 16"):
        op(q[..., :16].contiguous(), k[..., :16].contiguous(), k[..., :16].contiguous(), torch.tensor([0]), 0.1)


@native_attention
def test_a_bf16_prompt_chunk_attends_with_the_native_kernel_and_training_does_not():
    """TorchOps.attention for a prompt chunk over a bf16 cache (at 0, after a prefix, ragged rows): the native
    kernel, within bf16 rounding of float32 SDPA; queries past the cache's end, or gradients wanted: torch's."""
    from codellama import ops
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 8, 40, 64, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 100, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    for start, keys in ((0, 40), (60, 100), (torch.tensor([60, 10]), 100)):
        kk, vv = k[:, :, :keys], v[:, :, :keys]
        assert ops._native_prefill_attention(q, kk, vv, start) is not None
        want = ops.TorchOps.attention(q.float(), kk.float(), vv.float(), start)
        torch.testing.assert_close(ops.TorchOps.attention(q, kk, vv, start).float(), want, atol=2e-2, rtol=0)
    assert ops._native_prefill_attention(q, k, v, 61) is None  # (queries up to 100: past the 100 keys)
    qg = q.clone().requires_grad_()
    assert ops._native_prefill_attention(qg, k, v, 60) is None
    ops.TorchOps.attention(qg, k, v, 60).float().sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0


AVX2_BF16_CHECK = """
import torch
from codellama import cpu_kernels
assert cpu_kernels.available("bf16") and cpu_kernels.isa("bf16") == "AVX2", cpu_kernels.isa("bf16")
w = torch.randn(37, 203).to(torch.bfloat16)  # 203: the last inputs outside the 8-wide steps
x = torch.randn(6, 203)
got = cpu_kernels.bf16_rows_linear(x, w).double()
want = cpu_kernels.bf16_rows_reference(x.double(), w)
bound = 203 * 2.0 ** -23 * (x.to(torch.bfloat16).double().abs() @ w.double().abs().T)
from codellama import ops  # the native attention needs AVX-512: torch's SDPA here
q, k = torch.randn(1, 4, 1, 64).to(torch.bfloat16), torch.randn(1, 4, 9, 64).to(torch.bfloat16)
assert ops._native_decode_attention(q, k, k, 8) is None and ops.TorchOps.attention(q, k, k, 8).shape == q.shape
q = torch.randn(1, 4, 3, 64).to(torch.bfloat16)  # (and so does a prompt chunk's)
assert ops._native_prefill_attention(q, k, k, 6) is None and ops.TorchOps.attention(q, k, k, 6).shape == q.shape
print("ok" if bool(((got - want).abs() <= bound + 1e-30).all()) else "worse", float((got - want).abs().max()))
"""


@native_bf16
def test_the_bf16_avx2_path_computes_the_same():
    r = run_python(AVX2_BF16_CHECK, **AVX2)
    assert r.stdout.startswith("ok"), r.stdout


FALLBACK_BF16_CHECK = """
import torch
from codellama.cpu import PackedLinear, RowsLinear, bf16_packing_supported, optimize_for_cpu
from codellama.testing import random_model
from codellama import ModelArgs
args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=128)
plain = random_model(args, seed=1, dtype=torch.bfloat16)
fast = optimize_for_cpu(random_model(args, seed=1, dtype=torch.bfloat16))
assert not any(isinstance(m, RowsLinear) for m in fast.modules())
assert not bf16_packing_supported() or isinstance(fast.output, PackedLinear)
tokens = torch.arange(5)[None]
want, got = plain(tokens).float(), fast(tokens).float()
print("ok", float((got - want).abs().max() / want.abs().max()))
"""


def test_without_the_native_kernel_bf16_layers_take_torchs():
    r = run_python(FALLBACK_BF16_CHECK, **{cpu_kernels.DISABLE_ENV: "0"})
    assert r.stdout.startswith("ok") and float(r.stdout.split()[1]) < 0.05, r.stdout
