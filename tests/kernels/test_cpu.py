import re

import pytest
import torch

from codellama import load_model
from codellama import cpu_kernels
from codellama.cpu import (MatvecLinear, PackedLinear, RowsLinear, bf16_packing_supported, fp32_packing_supported,
                           matvec_layout, optimize_for_cpu)
from codellama.engine import Engine, SamplingParams

from helpers import CONFIGS, random_model, random_state_dict, write_checkpoint

ARGS = CONFIGS["gqa"]
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))


def logits(model):
    model.clear_cache()
    with torch.inference_mode():
        return model(TOKENS)


def test_fp32_packed_weights_keep_names_shapes_and_results():
    plain = random_model(ARGS, seed=1)
    expected = logits(plain)
    fast = optimize_for_cpu(random_model(ARGS, seed=1))
    if fp32_packing_supported():  # fused, packed for oneDNN
        assert isinstance(fast.layers[0].attention.wqkv, PackedLinear)
    else:  # fused, stored (in, out)
        assert fast.layers[0].attention.wqkv.weight.stride(0) == 1
    torch.testing.assert_close(logits(fast), expected, atol=1e-5, rtol=1e-5)
    for k, v in random_state_dict(ARGS, seed=1).items():
        assert torch.equal(fast.state_dict()[k], v), k


@pytest.mark.skipif(not bf16_packing_supported(), reason="this CPU/torch build has no oneDNN bf16 support")
def test_bf16_packed_weights_round_trip_and_compute_the_same(tmp_path):
    plain = random_model(ARGS, seed=2, dtype=torch.bfloat16)
    expected = logits(plain)
    fast = optimize_for_cpu(random_model(ARGS, seed=2, dtype=torch.bfloat16))
    if cpu_kernels.available("bf16"):  # the weights stay where they are (not fused: that would copy them)
        assert isinstance(fast.layers[1].feed_forward.w1, RowsLinear) and isinstance(fast.output, RowsLinear)
    else:
        assert isinstance(fast.layers[1].feed_forward.w13, PackedLinear) and isinstance(fast.output, PackedLinear)
    got = logits(fast)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 outputs, different kernels
    assert got.argmax(-1).eq(expected.argmax(-1)).float().mean() > 0.9
    state = fast.state_dict()
    for k, v in random_state_dict(ARGS, seed=2, dtype=torch.bfloat16).items():
        assert torch.equal(state[k], v), k  # packing is lossless: the checkpoint comes back bit for bit
    fast.load_state_dict(random_state_dict(ARGS, seed=3, dtype=torch.bfloat16))
    torch.testing.assert_close(logits(fast), logits(random_model(ARGS, seed=3, dtype=torch.bfloat16)), atol=0.5, rtol=0.05)


def test_load_model_optimizes_on_cpu_unless_asked_not_to(tmp_path):
    write_checkpoint(tmp_path, ARGS, "meta", seed=4)
    output = load_model(tmp_path, device="cpu").output
    assert isinstance(output, PackedLinear) if fp32_packing_supported() else output.weight.stride() == (1, ARGS.vocab_size)
    assert load_model(tmp_path, device="cpu", optimize=False).output.weight.stride() == (ARGS.dim, 1)


def test_fused_projections_keep_logits_and_meta_names():
    model = random_model(ARGS, seed=5)
    expected = logits(model)
    model.fuse()
    assert not hasattr(model.layers[0].attention, "wq") and hasattr(model.layers[0].feed_forward, "w13")
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=1e-6)
    reference = random_state_dict(ARGS, seed=5)
    assert model.state_dict().keys() == reference.keys()
    model.load_state_dict(random_state_dict(ARGS, seed=6))  # Meta names load into the fused model
    torch.testing.assert_close(logits(model), logits(random_model(ARGS, seed=6)), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not bf16_packing_supported(), reason="oneDNN bf16 packing is unavailable on this CPU")
def test_packed_weight_is_a_buffer_that_moves_and_casts():
    layer = PackedLinear(torch.randn(24, 16).bfloat16())
    assert [name for name, _ in layer.named_buffers()] == ["packed"] and layer.packed.is_mkldnn
    x = torch.randn(3, 16)
    want = torch.nn.functional.linear(x, layer.weight.float())
    layer.half()  # cast to a dtype oneDNN does not pack: a dense fp16 weight, same values
    assert not layer.packed.is_mkldnn and layer.packed.dtype == torch.float16
    torch.testing.assert_close(layer(x.half()).float(), want, atol=0.02, rtol=0.01)
    layer.to(torch.bfloat16)  # and back: packed again
    assert layer.packed.is_mkldnn
    torch.testing.assert_close(layer(x.bfloat16()).float(), want, atol=0.1, rtol=0.05)


def test_an_avx2_only_cpu_computes_bf16_without_onednn():
    """oneDNN's bf16 needs AVX-512 or AVX-NE-CONVERT: emulate an AVX2-only CPU, where packing must be found
    unsupported (not crash) and bf16 models still load and run."""
    import os
    import subprocess
    import sys
    code = ("import torch; from codellama import load_model; from codellama.cpu import bf16_packing_supported, "
            "bf16_path; assert not bf16_packing_supported(); m = load_model(dtype='bf16', device='cpu'); "
            "print(bf16_path(), m(torch.tensor([[1, 2, 3]])).shape)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no oneDNN bf16" in r.stdout and "torch.Size([1, 3, 4096])" in r.stdout


# ----------------------------------------------------------------------------- the compiled one-row step
def test_matvec_layout_keeps_names_values_and_results():
    expected = logits(random_model(ARGS, seed=7))
    model = optimize_for_cpu(random_model(ARGS, seed=7))  # packed first: matvec_layout takes it back to dense
    matvec_layout(model)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 4 * ARGS.n_layers + 1 and all(isinstance(m, MatvecLinear) for m in layers)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(m.weight.is_contiguous() for m in layers)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    for k, v in random_state_dict(ARGS, seed=7).items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matvec_matches_float64(dtype):
    """Inside torch.compile a one-row input takes the reduction Inductor writes; it must be the product."""
    g = torch.Generator().manual_seed(8)
    w, x = torch.randn(77, 203, generator=g), torch.randn(1, 1, 203, generator=g)
    layer = MatvecLinear.of(w.to(dtype))
    got = torch.compile(layer, dynamic=False)(x.to(dtype))
    want = x.to(dtype).double() @ w.to(dtype).double().t()
    assert got.shape == (1, 1, 77) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 0.02 * want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    assert torch.equal(layer(x.to(dtype)), torch.nn.functional.linear(x.to(dtype), layer.weight))  # eager: F.linear


# K = 203: one torch's bf16 int8 kernel cannot take (its fp32 path runs past INT8_COMPILED_ROWS)
@pytest.mark.parametrize("dtype, in_features", [(torch.float32, 203), (torch.bfloat16, 256)])
def test_compiled_int8_rows_match_float64(dtype, in_features, monkeypatch):
    """Without the native kernel, inside torch.compile an int8 layer's few rows take the sums over the codes
    (eager: torch's kernel); both are the product with the dequantized weight."""
    from codellama import cpu
    from codellama.quantize import Int8Linear, QuantConfig
    monkeypatch.setattr(cpu, "native_kernel_available", lambda scheme="int4": False)
    g = torch.Generator().manual_seed(9)
    dense = torch.nn.Linear(in_features, 77, bias=False).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(77, in_features, generator=g))
    layer = Int8Linear.from_float(dense, QuantConfig("int8"))
    layer.to_cpu_layout()
    w = layer.dequantize(torch.float64)
    compiled = torch.compile(layer, dynamic=False)
    for rows in (1, 3, 9):  # 9: more than INT8_COMPILED_ROWS, torch's kernel compiled
        x = torch.randn(1, rows, in_features, generator=g).to(dtype)
        want = x.double() @ w.t()
        for got, exact in ((compiled(x), rows <= 8 and dtype == torch.float32), (layer(x), False)):
            # float32 sums of a float32 row; torch's kernel computes with bf16 activations
            tol = (1e-5 if exact else 0.02) * want.abs().max().item()
            assert got.shape == (1, rows, 77) and got.dtype == dtype
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_cpu_decode_attention_reads_the_cache_in_its_dtype(dtype):
    """A compiled CPU decode step attends over a bf16/fp16 cache with sums Inductor fuses (no SDPA on float32
    copies of it): against float64 with each row's own last position, grouped-query heads, and the eager path."""
    from torch._inductor.utils import run_and_get_code
    from codellama.ops import TorchOps
    g = torch.Generator().manual_seed(12)
    B, H, Hkv, L, hd = 3, 4, 2, 40, 16
    q = torch.randn(B, H, 1, hd, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, L, hd, generator=g).to(dtype) for _ in range(2))
    k[1, :, 8:] = float("nan")  # past row 1's position: must not be read into its result
    v[1, :, 8:] = float("nan")
    pos = torch.tensor([L - 1, 7, 20])
    compiled = torch.compile(TorchOps.attention, dynamic=False)
    got, code = run_and_get_code(compiled, q, k, v, pos)
    assert "scaled_dot_product" not in "".join(code)
    want = []
    for b in range(B):
        qd, kd, vd = q[b].double(), k[b, :, :pos[b] + 1].double(), v[b, :, :pos[b] + 1].double()
        kd, vd = kd.repeat_interleave(H // Hkv, 0), vd.repeat_interleave(H // Hkv, 0)
        want.append(torch.softmax(qd @ kd.transpose(-1, -2) / hd ** 0.5, -1) @ vd)
    want = torch.stack(want)
    assert got.shape == (B, H, 1, hd) and got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, atol=eps, rtol=eps)  # float32 sums, one rounding to dtype
    k[1, :, 8:], v[1, :, 8:] = 0, 0  # the eager path (SDPA over float32 copies) masks by adding -inf
    torch.testing.assert_close(TorchOps.attention(q, k, v, pos).double(), want, atol=eps, rtol=eps)


def test_eager_cpu_decode_attention_copies_into_buffers_it_keeps_per_thread(monkeypatch):
    """Where the native decode attention does not run (no AVX-512: switched off here), the float32 copies of a
    bf16 cache go into buffers kept per thread (fresh tensors were fresh pages every layer and step): the same
    values as ``.float()``, the same memory while they fit, a larger buffer when they do not, another thread its
    own; and the attention equals SDPA over plain float32 copies."""
    import threading
    from codellama import ops
    monkeypatch.setattr(ops, "_native_decode_attention", lambda *args: None)
    g = torch.Generator().manual_seed(3)
    ops._scratch.__dict__.pop("buffers", None)  # (this thread's, from earlier tests)
    q = torch.randn(2, 4, 1, 16, generator=g).to(torch.bfloat16)
    cache = torch.randn(2, 2, 2, 64, 16, generator=g).to(torch.bfloat16)  # (k/v, B, Hkv, capacity, hd)
    k, v = cache[0, :, :, :30], cache[1, :, :, :30]  # a view of the first 30 positions, as the model passes it
    kf, vf = ops.float_copies(k, v)
    assert torch.equal(kf, k.float()) and torch.equal(vf, v.float()) and kf.dtype == torch.float32
    first = kf.data_ptr()
    kf2, _ = ops.float_copies(cache[0, :, :, :31], cache[1, :, :, :31])
    assert kf2.data_ptr() == first  # made half again as large as first asked: one more position fits
    big, _ = ops.float_copies(cache[0], cache[1])
    assert torch.equal(big, cache[0].float())  # (a larger buffer where it did not)
    other = []
    thread = threading.Thread(target=lambda: other.append(ops.float_copies(k, v)[0].data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != big.data_ptr()
    got = ops.TorchOps.attention(q, k, v, 29)
    want = ops._grouped_sdpa(q.float(), k.float(), v.float(), None).to(torch.bfloat16)
    assert torch.equal(got, want)
    ops._scratch.__dict__.pop("buffers", None)
    with torch.inference_mode():  # made under inference mode (the engine's steps), written outside it too
        assert torch.equal(ops.TorchOps.attention(q, k, v, 29), want)
    assert torch.equal(ops.TorchOps.attention(q, k, v, 29), want)
    kg = k.clone().requires_grad_()  # a forward that needs gradients gets copies of its own
    assert ops.float_copies(kg, v)[0].grad_fn is not None and ops._scratch.buffers.grad_fn is None


def test_compiled_bf16_decode_of_ragged_rows_matches_eager():
    """A compiled bf16 step over three slots (rows at different positions, one slot idle at first) gives the
    eager engine's greedy tokens, and log-probabilities within bf16's rounding of them."""
    model = random_model(ARGS, seed=13, dtype=torch.bfloat16)
    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=True)
    prompts = [TOKENS[0].tolist(), TOKENS[1, :5].tolist()]
    runs = []
    for compile in (False, True):
        engine = Engine(optimize_for_cpu(model), max_batch_size=3, max_seq_len=64, compile=compile)
        runs.append([r.result() for r in [engine.submit(p, greedy) for p in prompts]])
    for eager, compiled in zip(*runs):
        assert compiled.tokens == eager.tokens
        torch.testing.assert_close(torch.tensor(compiled.logprobs), torch.tensor(eager.logprobs), atol=0.05, rtol=0)


def test_compiled_decode_writes_the_cache_in_place():
    """The compiled step writes each new key into the cache itself: through a view of one layer, torch.compile
    copied that layer's whole cache every step (a step grew with max_seq_len × slots: 25 ms at 512 positions,
    180 ms at 4,096 on the 194M model). The generated code must hold no loop over one layer's cache."""
    from torch._inductor.utils import run_and_get_code
    model = random_model(ARGS, seed=9)
    slots, max_len = 3, 1000
    per_layer = slots * ARGS.kv_heads * max_len * ARGS.head_dim  # elements of one layer's keys
    engine = Engine(model, max_batch_size=slots, max_seq_len=max_len, compile=True)
    r = engine.submit(TOKENS[0].tolist(), SamplingParams(temperature=0, max_tokens=2))
    engine.step()  # prefill (eager) and the first token
    _, code = run_and_get_code(lambda: engine.step())  # the first compiled decode step
    assert r.result().tokens and code and "cpp_fused" in code[0]
    loops = [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", code[0])]  # C++ loop bounds
    assert loops and max(loops) < per_layer // slots, sorted(set(loops))


def one_row_greedy(model, compile: bool, max_tokens: int):
    """Greedy tokens of two prompts, one at a time, from a one-slot engine (eager or compiled)."""
    engine = Engine(model, max_batch_size=1, max_seq_len=128, compile=compile)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [engine.submit(p, greedy).result().tokens for p in (TOKENS[0].tolist(), TOKENS[1, :5].tolist())]


def test_compiled_one_row_decode_gives_the_eager_tokens():
    """fp32: the same greedy tokens (bf16's kernels round differently; its products are checked above)."""
    want = one_row_greedy(optimize_for_cpu(random_model(ARGS, seed=10)), False, 40)
    model = matvec_layout(optimize_for_cpu(random_model(ARGS, seed=10)))
    assert one_row_greedy(model, True, 40) == want


def test_build_lays_out_the_weights_for_the_step_that_decodes():
    from codellama import Llama
    one_row = Llama.build(max_seq_len=64, max_batch_size=1, device="cpu", compile=True).model
    assert isinstance(one_row.output, MatvecLinear) and isinstance(one_row.layers[0].feed_forward.w13, MatvecLinear)
    for kw in (dict(max_batch_size=2, compile=True), dict(max_batch_size=1)):  # oneDNN's layout for these
        model = Llama.build(max_seq_len=64, device="cpu", **kw).model
        assert not isinstance(model.output, MatvecLinear), kw


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_decode_of_a_quantized_fp32_model_gives_the_eager_tokens(scheme):
    """Inside the compiled graph int4 layers run torch's kernel (an fp32 model hands it bf16 activations) and
    int8 layers ``int8_rows`` in float32 (torch's kernel, with scales cast in the graph, past 8 rows: see
    test_compiled_int8_rows_match_float64); the greedy tokens are the eager ones."""
    from codellama.quantize import QuantConfig, quantize_model
    config = QuantConfig(scheme, 32) if scheme == "int4" else QuantConfig(scheme)
    want = one_row_greedy(optimize_for_cpu(quantize_model(random_model(ARGS, seed=11), config)), False, 24)
    model = matvec_layout(optimize_for_cpu(quantize_model(random_model(ARGS, seed=11), config)))
    assert one_row_greedy(model, True, 24) == want
