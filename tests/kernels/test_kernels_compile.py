"""The kernels compile for real GPUs with the launchers' own configurations; no GPU needed.

Triton's interpreter (tests/test_kernels.py) never runs Triton's compiler, so a kernel can pass there and
still fail to compile, spill registers or overflow shared memory on a GPU. This test compiles each kernel
ahead of time for sm_90 (H100) and sm_80 (A100) with Triton's bundled ptxas, in a subprocess without
TRITON_INTERPRET, and reads the cubins' resource usage with the bundled cuobjdump.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from conftest import ROOT
NVIDIA_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
A100_SHARED_BYTES = 166_912  # the smaller of the two cards' per-block limits (H100: 232,448)
MAX_STACK_BYTES = 64  # a few spilled registers at most

# Runs in the subprocess: compile every case, print one JSON line per case.
SCRIPT = r'''
import json, os, subprocess, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from codellama.kernels.flash_attention import _flash_attn_fwd_kernel, flash_config
from codellama.kernels.decode_attention import _decode_split_kernel, _decode_combine_kernel, DECODE_CONFIGS
from codellama.kernels.flash_attention import head_dim_bucket
from codellama.kernels.rmsnorm import _rms_norm_kernel, rms_norm_config
from codellama.kernels.rope import _rope_kernel, rotary_config

CUOBJDUMP = sys.argv[1]

def compile_for(arch, fn, types, consts, warps, stages=1):
    sig = {n: ("constexpr" if n in consts else ("i32" if n.startswith("stride") else types[n])) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    fields = dict(item.split(":") for item in next(l for l in usage.splitlines() if "REG:" in l).split())
    return dict(shared=k.metadata.shared, regs=int(fields["REG"]), stack=int(fields["STACK"]))

for arch in (90, 80):
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        precision = "ieee" if dt == "fp32" else "tf32"
        for hd in (64, 128):
            bm, bn, w, s = flash_config(hd, 4096, torch_dt)
            types = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Out=f"*{dt}", StartPos="*i64", start_pos="i32",
                         qk_scale="fp32", T="i32", L="i32", H="i32")
            consts = dict(GROUP=4, HEAD_DIM=hd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=hd, PER_ROW=True, UPCAST=False,
                          PRECISION=precision)
            print(json.dumps(dict(case=f"flash sm_{arch} {dt} hd{hd} {(bm, bn, w, s)}",
                                  **compile_for(arch, _flash_attn_fwd_kernel, types, consts, w, s))), flush=True)
            bn, w, s = DECODE_CONFIGS[(dt != "fp32", head_dim_bucket(hd))]
            types = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", StartPos="*i64", OutPart="*fp32", LsePart="*fp32",
                         start_pos="i32", qk_scale="fp32", chunk="i32", L="i32")
            consts = dict(GROUP=8, BLOCK_G=16, HEAD_DIM=hd, BLOCK_D=hd, BLOCK_N=bn, PER_ROW=True, DIRECT=False,
                          UPCAST=False, PRECISION=precision)
            print(json.dumps(dict(case=f"decode sm_{arch} {dt} hd{hd} {(bn, w, s)}",
                                  **compile_for(arch, _decode_split_kernel, types, consts, w, s))), flush=True)
    types = dict(OutPart="*fp32", LsePart="*fp32", Out="*bf16", H="i32", num_splits="i32")
    consts = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_H=16, BLOCK_S=128)
    print(json.dumps(dict(case=f"combine sm_{arch}", **compile_for(arch, _decode_combine_kernel, types, consts, 4))))
    for D in (4096, 8192):
        block_d, rows, w = rms_norm_config(D)
        types = dict(X="*bf16", W="*bf16", Out="*bf16", n_rows="i32", D="i32", eps="fp32")
        print(json.dumps(dict(case=f"rmsnorm sm_{arch} D{D}",
                              **compile_for(arch, _rms_norm_kernel, types, dict(BLOCK_D=block_d, ROWS=rows), w))))
    for H, Hkv in ((32, 32), (64, 8)):
        block_p, block_h, w = rotary_config(H, Hkv, 128)
        types = dict(Q="*bf16", K="*bf16", QOut="*bf16", KOut="*bf16", Cos="*fp32", Sin="*fp32", T="i32", H="i32", HKV="i32")
        consts = dict(HALF=64, BLOCK_P=block_p, BLOCK_H=block_h)
        print(json.dumps(dict(case=f"rope sm_{arch} {H}/{Hkv}", **compile_for(arch, _rope_kernel, types, consts, w))))
'''


@pytest.mark.slow
@pytest.mark.skipif(not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists(),
                    reason=f"Triton's bundled ptxas/cuobjdump not found under {NVIDIA_BIN}")
def test_kernels_compile_for_h100_and_a100_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(NVIDIA_BIN / "cuobjdump")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"compilation failed:\n{run.stderr[-4000:]}"
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 * (2 * 2 * 2 + 1 + 2 + 2), run.stdout
    for r in results:
        assert r["shared"] <= A100_SHARED_BYTES, f"{r['case']}: {r['shared']} bytes of shared memory"
        assert r["stack"] <= MAX_STACK_BYTES, f"{r['case']}: {r['stack']} bytes of stack (register spills)"
