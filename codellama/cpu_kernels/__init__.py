"""Hand-written x86 kernels for int4 weights, built from C++ at first use, with their PyTorch references.

torch's CPU int4 kernel (``aten::_weight_int4pack_mm_for_cpu``) multiplies in floating point and is
compute-bound on a few cores: it reads a 7B model's codes at about half the memory bandwidth. llama.cpp's
Q4_0 path instead quantizes the activations to int8 and multiplies integers (AVX-512 VNNI ``vpdpbusd``: 64
multiply-adds an instruction), which keeps up with memory. ``int4_tiles.cpp`` does the same on this library's
int4 codes, in a layout of 16-row tiles (``int4_tiles``) made from the checkpoint's bytes by moving whole bytes:

    python:  tiles, sz = int4_tiles(codes, scales, zeros, group_size)        # once, at load
             y = int4_tiles_linear(x, tiles, sz, group_size, out_features)   # x (…, K) → (…, N)

Each call quantizes x per half group (``G/2`` inputs: ``x ≈ d·a``, ``a`` int8, ``d = max|x|/127``), then sums
``s·(d_lo·Σ(q−8)·a + d_hi·Σ(q−8)·a) + z·Σx`` per group in int32 and float32 (``int4_tiles_reference`` is the
same arithmetic in PyTorch). The activations' rounding is below bf16's for all but the smallest inputs of a
half group; the tests bound the result against float64.

The extension is compiled with the system's C++ compiler against torch's headers (about 15 s, once per torch
version, cached in ``$CODELLAMA_KERNEL_CACHE`` or ``~/.cache/codellama/kernels``) and picks its AVX-512 VNNI
or AVX2 code at run time (``ATEN_CPU_CAPABILITY=avx2`` selects AVX2, as it does for torch's own kernels).
Where it cannot be built or run (no compiler, not x86-64, ``CODELLAMA_NATIVE_KERNELS=0``), ``available()``
is False, one line on stderr says why, and int4 layers keep torch's kernel.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

import torch

TILE = 16  # output rows per tile (the int32 lanes of a 512-bit register)
ISA_NAMES = {1: "AVX2", 2: "AVX-512 VNNI"}
DISABLE_ENV = "CODELLAMA_NATIVE_KERNELS"  # "0": never build or use the extension
CACHE_ENV = "CODELLAMA_KERNEL_CACHE"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int4_tiles.cpp")


# ----------------------------------------------------------------------------- building
def _cache_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "codellama", "kernels")
    return root


def _compile(source: str, target: str) -> None:
    """``source`` → shared library ``target`` with g++ against torch's headers and libraries (no ninja, no pybind11)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "g++")
    libs = cpp_extension.library_paths()
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", source, "-o", target,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in cpp_extension.include_paths()], *[f"-L{p}" for p in libs],
           "-lc10", "-ltorch_cpu", *[f"-Wl,-rpath,{p}" for p in libs]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else 'no output'}")


def _library_path() -> str:
    """The cached build of the extension for this source and torch build, compiled first when missing."""
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    directory = _cache_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"int4_tiles-{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)  # another process may be building it too
        os.close(fd)
        try:
            _compile(_SOURCE, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


_loaded: List[Tuple[int, str]] = []  # what _load found, once per process


def _load() -> Tuple[int, str]:
    """``(isa, reason)``: the instruction set the kernels run with (0: they cannot run here, and why)."""
    if not _loaded:
        _loaded.append(_build_and_load())
    return _loaded[0]


def _build_and_load() -> Tuple[int, str]:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return 0, f"{DISABLE_ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0, f"they are written for x86-64, not {platform.machine()}"
    try:
        torch.ops.load_library(_library_path())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return 0, f"building them failed ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})"
    _register_fake()
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY, as torch's kernels do
    allowed = 2 if capability.startswith("AVX512") else 1 if capability.startswith("AVX2") else 0
    isa = min(int(torch.ops.codellama_native.supported_isa()), allowed)
    return isa, "" if isa else f"this CPU has neither AVX2 nor AVX-512 VNNI (torch reports {capability})"


def _register_fake() -> None:
    @torch.library.register_fake("codellama_native::int4_tiles_linear")
    def _(x, tiles, sz, group_size, out_features, isa):
        return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


_told = []


def available() -> bool:
    """Whether the int4 kernels run here (built on first call); says once on stderr why not, when they do not."""
    isa, why = _load()
    if not isa and not _told:
        _told.append(why)
        print(f"codellama: int4 layers use torch's CPU kernel: the native int4 kernels are unavailable: {why}",
              file=sys.stderr)
    return bool(isa)


def isa() -> Optional[str]:
    """The instruction set the kernels use here (``"AVX-512 VNNI"`` or ``"AVX2"``), None when unavailable."""
    return ISA_NAMES.get(_load()[0])


# ----------------------------------------------------------------------------- the layout
def int4_tiles(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``codellama.quantize``'s int4 weight as the kernels read it: ``(tiles, sz)``.

    ``codes`` (N, Kp/2) uint8, two codes a byte (byte ``j`` of a group: inputs ``j`` and ``j + G/2``);
    ``scales``/``zeros`` (N, Kp/G). ``tiles`` (Nt, Kp/G, G/8, 64) uint8, Nt = ⌈N/16⌉ (rows padded with
    zero codes): byte ``4i + j`` of chunk ``c`` of group ``g`` of tile ``t`` is row ``16t + i``'s byte
    ``g·G/2 + 4c + j``, so each 64-byte chunk is 16 rows × 4 inputs of each nibble plane. ``sz`` (Nt, Kp/G,
    2, 16): the tile's scales, then its zeros, in bf16 when the scales are bf16 and float32 otherwise (so
    ``untile_int4`` gives back the exact tensors).
    """
    N, half = codes.shape
    G = group_size
    groups = scales.shape[1]
    pad = -N % TILE
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad, half)))
        scales, zeros = (torch.cat((t, t.new_zeros(pad, groups))) for t in (scales, zeros))
    Nt = (N + pad) // TILE
    # (Nt, 16 rows i, groups g, G/8 chunks c, 4 bytes j) → (Nt, g, c, i, j)
    tiles = codes.view(Nt, TILE, groups, G // 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    sz_dtype = torch.bfloat16 if scales.dtype == torch.bfloat16 else torch.float32
    sz = torch.stack((scales, zeros)).to(sz_dtype).view(2, Nt, TILE, groups).permute(1, 3, 0, 2).contiguous()
    return tiles.view(Nt, groups, G // 8, 64), sz


def untile_int4(tiles: torch.Tensor, sz: torch.Tensor, out_features: int,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``int4_tiles``: ``(codes, scales, zeros)`` of the first ``out_features`` rows, scales in ``dtype``."""
    Nt, groups, chunks, _ = tiles.shape
    codes = tiles.view(Nt, groups, chunks, TILE, 4).permute(0, 3, 1, 2, 4).reshape(Nt * TILE, groups * chunks * 4)
    scales, zeros = sz.permute(2, 0, 3, 1).reshape(2, Nt * TILE, groups).to(dtype)
    return codes[:out_features], scales[:out_features], zeros[:out_features]


# ----------------------------------------------------------------------------- the product
def int4_tiles_linear(x: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, group_size: int,
                      out_features: int) -> torch.Tensor:
    """``x @ W.T`` for x (…, Kp) (Kp: the stored inputs, padding included) and W in tiles: (…, N) in x's dtype."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    isa = _load()[0]  # (loads the extension: the operator exists after this)
    out = torch.ops.codellama_native.int4_tiles_linear(x2.contiguous(), tiles, sz, group_size, out_features, isa)
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


def int4_tiles_reference(x: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, group_size: int,
                         out_features: int) -> torch.Tensor:
    """``int4_tiles_linear`` in PyTorch: the same quantized activations and integer sums (float64 accumulation)."""
    G, H = group_size, group_size // 2
    K = x.shape[-1]
    xf = x.reshape(-1, K).float()
    halves = xf.view(-1, K // H, H)  # (M, K/H, H)
    amax = halves.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    a = (halves * inv).round()  # (M, K/H, H) integers in [-127, 127]
    d = amax / 127
    codes, scales, zeros = untile_int4(tiles, sz, out_features, torch.float64)
    q = torch.cat((codes.view(-1, K // G, H) & 15, codes.view(-1, K // G, H) >> 4), dim=-1)  # (N, K/G, G)
    q = (q.double() - 8).view(-1, K // H, H)  # (N, K/H, H): each half group's codes
    dots = torch.einsum("mhk,nhk->mnh", a.double(), q)  # exact integer sums per half group
    per_half = dots * d.double().squeeze(-1).unsqueeze(1)  # (M, N, K/H)
    per_group = per_half.view(per_half.shape[0], -1, K // G, 2).sum(-1)  # (M, N, K/G)
    sumx = xf.double().view(-1, K // G, G).sum(-1)  # (M, K/G)
    out = (per_group * scales).sum(-1) + sumx @ zeros.T
    return out.to(x.dtype).view(*x.shape[:-1], out_features)
