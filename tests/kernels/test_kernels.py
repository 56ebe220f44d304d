"""Triton kernels against float64 references.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; tests marked ``gpu`` (bf16 attention, long sequences) run only where CUDA exists.
Unused KV-cache slots are filled with NaN: a kernel that reads one poisons its output and fails.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from codellama import kernels  # noqa: E402
from codellama.model import rope_angles, rope_inv_freq
from codellama.ops import TorchOps  # noqa: E402
from codellama.kernels.flash_attention import attention_reference  # noqa: E402

OK, WHY = kernels.triton_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Triton kernels cannot run here: {WHY}")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU_ONLY = "needs a CUDA GPU: Triton's CPU interpreter mis-multiplies bf16 and is too slow for long sequences"

# Tolerances against a float64 reference computed from the same (rounded) inputs.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2)}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype, f"result dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def _rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def cache_views(B, Hkv, L, hd, dtype, lengths, seed=1):
    """k, v (B, Hkv, L, hd) sliced from a (layers, Bmax, Hkv, S, hd) buffer like the model's KV cache.

    Row b holds random values at positions < lengths[b] and NaN after (garbage the kernels must not read).
    """
    bufs = []
    for i in range(2):
        buf = torch.full((2, B + 1, Hkv, L + 13, hd), float("nan"), dtype=dtype, device=DEVICE)
        for b, n in enumerate(lengths):
            buf[1, b, :, :n] = _rand(Hkv, n, hd, dtype=dtype, seed=seed + 10 * b + i)
        bufs.append(buf[1, :B, :, :L])
    return bufs


def queries(B, H, T, hd, dtype, seed=2) -> torch.Tensor:
    """q (B, H, T, hd) as the model makes it: a transposed view of (B, T, H, hd)."""
    return _rand(B, T, H, hd, dtype=dtype, seed=seed).transpose(1, 2)


def reference(q, k, v, start_pos) -> torch.Tensor:
    """Float64 attention on the inputs' own device (a GPU makes the long-sequence references cheap)."""
    return attention_reference(q.double(), k.double(), v.double(), start_pos)


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 130), (2, 4096), (33, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm(shape, dtype):
    from codellama.kernels.rmsnorm import rms_norm, rms_norm_reference
    x = _rand(*shape, dtype=dtype) * 3
    w = _rand(shape[-1], dtype=dtype, seed=5)
    out = rms_norm(x, w, 1e-5)
    assert out.shape == x.shape
    close(out, rms_norm_reference(x.double(), w.double(), 1e-5), dtype)
    # Same rounding points as PyTorch's (and Meta's) RMSNorm in the input dtype.
    close(out, TorchOps.rms_norm(x, w, 1e-5), dtype)


def test_rms_norm_promotes_like_torch():
    from codellama.kernels.rmsnorm import rms_norm
    x = _rand(5, 64, dtype=torch.float16)
    w = _rand(64, seed=3)  # float32 weight on float16 activations: the product promotes to float32
    out = rms_norm(x, w, 1e-6)
    expected = TorchOps.rms_norm(x, w, 1e-6)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("T,H,Hkv,hd", [(1, 8, 8, 64), (7, 8, 2, 128), (5, 8, 1, 64), (3, 4, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotary(T, H, Hkv, hd, dtype, per_row):
    from codellama.kernels.rope import rotary, rotary_reference
    B = 2
    # q and k as strided views of one fused projection output (last dim contiguous).
    qkv = _rand(B, T, (H + 2 * Hkv) * hd, dtype=dtype)
    q = qkv[..., :H * hd].view(B, T, H, hd)
    k = qkv[..., H * hd:(H + Hkv) * hd].view(B, T, Hkv, hd)
    # Positions near 100k with theta 1e6 (Code Llama long context): float32 angles.
    starts = torch.tensor([[100_000], [17]]) if per_row else torch.tensor([[99_990]])
    positions = (starts + torch.arange(T)).to(DEVICE)  # (B|1, T)
    cos, sin = rope_angles(positions, rope_inv_freq(hd, 1e6, DEVICE))
    qo, ko = rotary(q, k, cos, sin)
    rq, rk = rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    assert qo.shape == q.shape and ko.shape == k.shape
    close(qo, rq, dtype)
    close(ko, rk, dtype)


# ----------------------------------------------------------------------------- flash attention (prefill)
FLASH_SHAPES = [  # (T, group = H / Hkv, head_dim)
    (1, 1, 64), (7, 4, 128), (7, 8, 64), (130, 1, 128), (130, 4, 64), (130, 8, 128),
]


@pytest.mark.parametrize("T,group,hd", FLASH_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_prefill(T, group, hd, dtype):
    from codellama.kernels.flash_attention import flash_attention
    B, Hkv = (2, 1) if T < 100 else (1, 2)
    H = group * Hkv
    q = queries(B, H, T, hd, dtype)
    k, v = cache_views(B, Hkv, T, hd, dtype, [T] * B)
    out = flash_attention(q, k, v, 0)
    assert out.shape == (B, H, T, hd)
    close(out, reference(q, k, v, 0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_long_irregular(dtype):
    """1000 queries (not a multiple of any block) over a cache longer than the row."""
    from codellama.kernels.flash_attention import flash_attention
    B, H, Hkv, T, hd = 1, 4, 1, 1000, 64
    q = queries(B, H, T, hd, dtype)
    k, v = cache_views(B, Hkv, T, hd, dtype, [T])
    out = flash_attention(q, k, v, 0, block_m=64, block_n=64)
    close(out, reference(q, k, v, 0), dtype)


@pytest.mark.parametrize("start,T,group,hd", [(37, 7, 4, 64), (100, 130, 8, 128), (5, 1, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_chunked_prefill(start, T, group, hd, dtype):
    """Queries at start … start+T-1 over cached keys 0 … start+T-1 (a later chunk of a prompt)."""
    from codellama.kernels.flash_attention import flash_attention
    B, Hkv = 1, 1
    H = group * Hkv
    L = start + T
    q = queries(B, H, T, hd, dtype)
    k, v = cache_views(B, Hkv, L, hd, dtype, [L])
    out = flash_attention(q, k, v, start)
    close(out, reference(q, k, v, start), dtype)
    # The same queries with start_pos as a per-row tensor.
    out_t = flash_attention(q, k, v, torch.tensor([start], device=DEVICE))
    torch.testing.assert_close(out_t, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("blocks", [(None, None), (16, 16), (64, 32)])
def test_flash_attention_ragged_rows(dtype, blocks):
    """Rows at different start positions in one batch; each row's slots past its end are NaN garbage."""
    from codellama.kernels.flash_attention import flash_attention
    starts = torch.tensor([0, 50, 3])
    B, H, Hkv, T, hd = 3, 4, 1, 23, 64
    L = int(starts.max()) + T
    q = queries(B, H, T, hd, dtype)
    k, v = cache_views(B, Hkv, L, hd, dtype, (starts + T).tolist())
    out = flash_attention(q, k, v, starts.to(DEVICE), block_m=blocks[0], block_n=blocks[1])
    close(out, reference(q, k, v, starts), dtype)


# ----------------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_mixed_lengths(group, hd, dtype):
    """One query per row over rows of lengths 1, 7, 130 and 1000 in one batch, split across programs."""
    from codellama.kernels.decode_attention import decode_attention
    lengths = torch.tensor([1, 7, 130, 1000])
    B, Hkv = 4, 2
    H = group * Hkv
    q = queries(B, H, 1, hd, dtype)
    k, v = cache_views(B, Hkv, int(lengths.max()), hd, dtype, lengths.tolist())
    start = (lengths - 1).to(DEVICE)
    out = decode_attention(q, k, v, start)
    assert out.shape == (B, H, 1, hd)
    close(out, reference(q, k, v, start), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_attention_splits(num_splits):
    """Any split count gives the same answer, including splits that start past a row's end."""
    from codellama.kernels.decode_attention import decode_attention
    B, H, Hkv, hd, L = 2, 4, 1, 64, 200
    q = queries(B, H, 1, hd, torch.float32)
    k, v = cache_views(B, Hkv, L, hd, torch.float32, [L, 45])
    start = torch.tensor([L - 1, 44], device=DEVICE)
    out = decode_attention(q, k, v, start, num_splits=num_splits)
    close(out, reference(q, k, v, start), torch.float32)


def test_decode_attention_int_start_pos():
    """An int start_pos: every row at the same position, keys beyond it (in L) are ignored."""
    from codellama.kernels.decode_attention import decode_attention
    B, H, Hkv, hd, L = 2, 8, 2, 128, 90
    q = queries(B, H, 1, hd, torch.float16)
    k, v = cache_views(B, Hkv, L, hd, torch.float16, [61, 61])
    out = decode_attention(q, k, v, 60)
    close(out, reference(q, k, v, 60), torch.float16)


# ----------------------------------------------------------------------------- the model's seam
def test_triton_ops_matches_torch_ops():
    """TritonOps, as the model calls it, equals TorchOps: prefill, chunk and decode through one cache."""
    B, H, Hkv, hd, S = 2, 8, 2, 64, 48
    ops = kernels.TritonOps
    kbuf = torch.zeros(1, B, Hkv, S, hd, device=DEVICE)
    vbuf = torch.zeros_like(kbuf)
    for start, T in ((0, 20), (20, 9), (29, 1), (30, 1)):
        q = queries(B, H, T, hd, torch.float32, seed=start)
        kbuf[0, :, :, start:start + T] = _rand(B, Hkv, T, hd, seed=100 + start)
        vbuf[0, :, :, start:start + T] = _rand(B, Hkv, T, hd, seed=200 + start)
        k, v = kbuf[0, :, :, :start + T], vbuf[0, :, :, :start + T]
        got, want = ops.attention(q, k, v, start), TorchOps.attention(q, k, v, start)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    x = _rand(B, 5, 256)
    w = _rand(256, seed=9)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), TorchOps.rms_norm(x, w, 1e-5), **TOL[torch.float32])


def test_triton_ops_falls_back_for_unsupported_input():
    """A head_dim the attention kernels cannot take goes to TorchOps, with a warning saying why."""
    q = queries(1, 2, 3, 320, torch.float32)
    k = _rand(1, 2, 3, 320, seed=4)
    v = _rand(1, 2, 3, 320, seed=5)
    with pytest.warns(UserWarning, match="head_dim 320"):
        out = kernels.TritonOps.attention(q, k, v, 0)
    torch.testing.assert_close(out, TorchOps.attention(q, k, v, 0))


def test_triton_available_reports_why_not(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    ok, why = kernels.triton_available()
    assert not ok and "triton cannot be imported" in why
    from codellama.kernels import select_ops
    assert select_ops("auto", "cpu") is TorchOps
    with pytest.raises(ValueError, match="unavailable"):
        select_ops("triton", "cpu")


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal without the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from codellama.kernels import checks
    from codellama.kernels.rmsnorm import rms_norm
    monkeypatch.setattr(checks, "interpreting", lambda: False)
    ok, why = kernels.triton_available()
    assert not ok and "TRITON_INTERPRET" in why
    x, w = _rand(2, 64), _rand(64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rms_norm(x, w, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(kernels.TritonOps.rms_norm(x, w, 1e-5), TorchOps.rms_norm(x, w, 1e-5))


# ----------------------------------------------------------------------------- input checks
def _attn_inputs(**change):
    args = dict(q=queries(1, 4, 3, 64, torch.float32), k=_rand(1, 2, 8, 64), v=_rand(1, 2, 8, 64, seed=3), start_pos=0)
    args.update(change)
    return args


BAD_ATTENTION = [
    ("dtype", lambda: _attn_inputs(k=_rand(1, 2, 8, 64, dtype=torch.float16)), "share one dtype"),
    ("int", lambda: _attn_inputs(q=torch.zeros(1, 4, 3, 64, dtype=torch.int32, device=DEVICE)), "valid: float16"),
    ("head_dim", lambda: _attn_inputs(k=_rand(1, 2, 8, 32), v=_rand(1, 2, 8, 32)), "head_dim must agree"),
    ("groups", lambda: _attn_inputs(k=_rand(1, 3, 8, 64), v=_rand(1, 3, 8, 64)), "multiple of key/value heads"),
    ("kv shape", lambda: _attn_inputs(v=_rand(1, 2, 9, 64)), "same shape"),
    ("3-D", lambda: _attn_inputs(q=_rand(4, 3, 64)), "must be 4-D"),
    ("strides", lambda: _attn_inputs(k=_rand(1, 2, 64, 8).transpose(2, 3)), "contiguous in its last"),
    ("too long", lambda: _attn_inputs(start_pos=6), "hold only 8 positions"),
    ("negative", lambda: _attn_inputs(start_pos=-1), "must be ≥ 0"),
    ("rows", lambda: _attn_inputs(start_pos=torch.tensor([0, 1], device=DEVICE)), r"shape \(1,\)"),
    ("float pos", lambda: _attn_inputs(start_pos=torch.tensor([0.0], device=DEVICE)), "valid: int32, int64"),
    ("head_dim 512", lambda: _attn_inputs(q=queries(1, 2, 3, 512, torch.float32), k=_rand(1, 2, 8, 512),
                                          v=_rand(1, 2, 8, 512)), "not supported"),
]


@pytest.mark.parametrize("make,match", [b[1:] for b in BAD_ATTENTION], ids=[b[0] for b in BAD_ATTENTION])
def test_attention_rejects_bad_input(make, match):
    from codellama.kernels.decode_attention import decode_attention
    from codellama.kernels.flash_attention import flash_attention
    args = make()
    with pytest.raises(ValueError, match=match):
        flash_attention(**args)
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


def test_decode_attention_rejects_several_queries():
    from codellama.kernels.decode_attention import decode_attention
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention(**_attn_inputs())
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(**_attn_inputs(q=queries(1, 4, 1, 64, torch.float32)), num_splits=0)


def test_rms_norm_rejects_bad_input():
    from codellama.kernels.rmsnorm import rms_norm
    x = _rand(3, 64)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, _rand(32), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(_rand(64, 3).t(), _rand(64), 1e-5)
    with pytest.raises(ValueError, match="valid: float16"):
        rms_norm(x.long(), _rand(64), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, _rand(64), 0.0)


def test_rotary_rejects_bad_input():
    from codellama.kernels.rope import rotary
    q, k = _rand(1, 4, 2, 16), _rand(1, 4, 1, 16)
    cos, sin = _rand(1, 4, 8), _rand(1, 4, 8, seed=1)
    with pytest.raises(ValueError, match="must be float32"):
        rotary(q, k, cos.half(), sin.half())
    with pytest.raises(ValueError, match="cos must have shape"):
        rotary(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="does not match q"):
        rotary(q, _rand(1, 4, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="even"):
        rotary(_rand(1, 4, 2, 7), _rand(1, 4, 1, 7), cos, sin)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=GPU_ONLY)
@pytest.mark.parametrize("T,group,hd", [(7, 4, 128), (130, 8, 64), (1000, 1, 128)])
def test_flash_attention_bf16(T, group, hd):
    from codellama.kernels.flash_attention import flash_attention
    B, Hkv = 2, 2
    q = queries(B, group * Hkv, T, hd, torch.bfloat16)
    k, v = cache_views(B, Hkv, T + 40, hd, torch.bfloat16, [T + 40, T + 3])
    start = torch.tensor([40, 3], device=DEVICE)
    close(flash_attention(q, k, v, start), reference(q, k, v, start), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=GPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_bf16_and_long(dtype):
    from codellama.kernels.decode_attention import decode_attention
    lengths = torch.tensor([1, 32_768, 5_000])
    B, H, Hkv, hd = 3, 64, 8, 128
    q = queries(B, H, 1, hd, dtype)
    k, v = cache_views(B, Hkv, int(lengths.max()), hd, dtype, lengths.tolist())
    start = (lengths - 1).to(DEVICE)
    close(decode_attention(q, k, v, start), reference(q, k, v, start), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=GPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attention_long_prefill(dtype):
    from codellama.kernels.flash_attention import flash_attention
    B, H, Hkv, T, hd = 1, 16, 4, 4096 + 17, 128
    q = queries(B, H, T, hd, dtype)
    k, v = cache_views(B, Hkv, T, hd, dtype, [T])
    close(flash_attention(q, k, v, 0), reference(q, k, v, 0), dtype)
