"""The Triton weight-only matmul (codellama/kernels/quant_matmul.py) against float64 references.

Without a GPU it runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); bf16 there
goes through the kernel's float32 upcast (the interpreter mis-multiplies bf16 tiles), so it is checked too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from codellama import kernels  # noqa: E402
from codellama.quantize import Int4Linear, Int8Linear, QuantConfig, quantize_int4, quantize_int8  # noqa: E402

OK, WHY = kernels.triton_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Triton kernels cannot run here: {WHY}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-3),
       torch.bfloat16: dict(atol=0.25, rtol=1e-2)}  # outputs rounded once to the dtype


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


SHAPES = [(1, 37, 64), (3, 64, 96), (17, 100, 130)]  # (M, N, K): decode, odd N, K past a block / a group


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_matmul(M, N, K, dtype):
    from codellama.kernels.quant_matmul import int8_matmul, int8_matmul_reference
    q, scales = quantize_int8(_rand(N, K, seed=1), dtype)
    x = _rand(2, M, K, seed=2, dtype=dtype)  # leading dims are flattened and restored
    out = int8_matmul(x, q, scales)
    assert out.shape == (2, M, N) and out.dtype == dtype
    torch.testing.assert_close(out.double(), int8_matmul_reference(x.double(), q, scales.double()), **TOL[dtype])


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_matmul(M, N, K, group_size, dtype):
    """K = 130 leaves a padded last group: its stored codes are multiplied by masked (zero) activations."""
    from codellama.kernels.quant_matmul import int4_matmul, int4_matmul_reference
    packed, scales, zeros = quantize_int4(_rand(N, K, seed=3), group_size, dtype)
    x = _rand(M, K, seed=4, dtype=dtype)
    out = int4_matmul(x, packed, scales, zeros, group_size)
    assert out.shape == (M, N) and out.dtype == dtype
    expected = int4_matmul_reference(x.double(), packed, scales.double(), zeros.double(), group_size)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


def test_launchers_name_the_problem():
    from codellama.kernels.quant_matmul import int4_matmul, int8_matmul
    q, s = quantize_int8(_rand(8, 32), torch.float32)
    with pytest.raises(ValueError, match=r"int8_matmul: int8 needs weight \(N, K\) and scales \(N,\) for x \(…, 16\)"):
        int8_matmul(_rand(2, 16), q, s)
    with pytest.raises(ValueError, match=r"int8_matmul: weight has dtype torch.float32; valid: int8"):
        int8_matmul(_rand(2, 32), q.float(), s)
    packed, scales, zeros = quantize_int4(_rand(8, 64), 32, torch.float32)
    with pytest.raises(ValueError, match=r"group_size must be 32, 64, 128 or 256, got 48"):
        int4_matmul(_rand(2, 64), packed, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"int4 needs weight \(N, 64\) and scales/zeros \(N, 4\) for x \(…, 128\)"):
        int4_matmul(_rand(2, 128), packed, scales, zeros, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layers take the Triton kernel on CUDA tensors only")
@pytest.mark.gpu
@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 128)])
def test_quantized_layers_use_the_kernel_on_cuda(config):
    linear = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = (Int8Linear if config.scheme == "int8" else Int4Linear).from_float(linear, config)
    x = _rand(3, 4096, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), (x @ layer.dequantize(torch.bfloat16).T).float(), atol=0.5, rtol=2e-2)


# Compiled ahead of time for sm_90 and sm_80 with the launcher's configurations, as tests/test_kernels_compile.py
# does for the other kernels (its script's first part defines ``compile_for``; this one adds the cases).
COMPILE_CASES = r'''
from codellama.kernels.quant_matmul import _quant_matmul_kernel, quant_matmul_config
import codellama.kernels.quant_matmul as qm
qm.interpreting = lambda: False  # the configurations of a GPU run
for arch in (90, 80):
    for dt in ("bf16", "fp16"):
        for scheme, group in (("int8", None), ("int4", 32), ("int4", 128)):
            for M in (1, 512):
                bm, bn, bk, w, s = quant_matmul_config(M, scheme, group)
                types = dict(X=f"*{dt}", W="*u8" if group else "*i8", Scales=f"*{dt}", Zeros=f"*{dt}", Out=f"*{dt}",
                             M="i32", N="i32", K="i32")
                consts = dict(INT4=bool(group), GROUP=group or bk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=False,
                              PRECISION="tf32")
                print(json.dumps(dict(case=f"sm_{arch} {dt} {scheme} g{group} M={M} {(bm, bn, bk, w, s)}",
                                      **compile_for(arch, _quant_matmul_kernel, types, consts, w, s))), flush=True)
'''


@pytest.mark.slow
def test_kernel_compiles_for_h100_and_a100_without_spills():
    import test_kernels_compile as tkc
    if not (tkc.NVIDIA_BIN / "ptxas").exists() or not (tkc.NVIDIA_BIN / "cuobjdump").exists():
        pytest.skip(f"Triton's bundled ptxas/cuobjdump not found under {tkc.NVIDIA_BIN}")
    prelude = tkc.SCRIPT[:tkc.SCRIPT.index("for arch in")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tkc.ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", prelude + COMPILE_CASES, str(tkc.NVIDIA_BIN / "cuobjdump")],
                         cwd=tkc.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"compilation failed:\n{run.stderr[-4000:]}"
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 * 2 * 3 * 2, run.stdout
    for r in results:
        assert r["shared"] <= tkc.A100_SHARED_BYTES, f"{r['case']}: {r['shared']} bytes of shared memory"
        assert r["stack"] <= tkc.MAX_STACK_BYTES, f"{r['case']}: {r['stack']} bytes of stack (register spills)"
