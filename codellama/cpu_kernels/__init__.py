"""Hand-written x86 kernels for CPU decoding, built from C++ at first use, each with its PyTorch reference.

Batch-1 decoding reads every weight once per token, so what a decode step costs is the rate a kernel
streams its weights at:

    int4.py  int4_tiles_linear  int4 codes × int8-quantized activations, integer dot products (AVX-512 VNNI
                                ``vpdpbusd``, as llama.cpp's Q4_0 path) over 16-row tiles made from the
                                checkpoint's bytes: torch's int4 kernel multiplies in floating point and is
                                compute-bound on a few cores
    int8.py  int8_rows_linear   int8 codes × int8-quantized activations, the same way (llama.cpp's Q8_0 path),
                                read where they lie (row-major, a view of the checkpoint's file): torch's
                                int8 kernel converts every code to floating point
    bf16.py  bf16_rows_linear   a few rows × a bf16 weight read in place, row by row (AVX-512 BF16
                                ``vdpbf16ps``): oneDNN is as fast, but only on its packed copy of the weight,
                                which takes ~2 s a GB to make (a minute of a 7B's load) and a second copy of
                                the file's pages; this reads the memory-mapped checkpoint itself
    attention.cpp               attention read from the bf16 KV cache in place (AVX-512; used by
                                ``codellama.ops``): a decode step's, where SDPA would need float32 copies of
                                every layer's keys and values (three times the cache's bytes through memory a
                                step), and a prompt chunk's (AVX-512 BF16 ``vdpbf16ps``, 2.2-4.9× torch's CPU
                                flash attention a layer, ``benchmarks/bench_attention.py --cpu-prefill``)

The extension is compiled with the system's C++ compiler against torch's headers (under a minute, once per
torch version, cached in ``$CODELLAMA_KERNEL_CACHE`` or ``~/.cache/codellama/kernels``; no ninja, no
pybind11) and picks its AVX-512 or AVX2 code at run time (``ATEN_CPU_CAPABILITY=avx2`` selects AVX2, as it
does for torch's own kernels). Where it cannot be built or run (no compiler, not x86-64,
``CODELLAMA_NATIVE_KERNELS=0``), ``available()`` is False, one line on stderr says why, and the layers keep
torch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

TILE = 16  # output rows per tile (the int32 lanes of a 512-bit register)
DISABLE_ENV = "CODELLAMA_NATIVE_KERNELS"  # "0": never build or use the extension
CACHE_ENV = "CODELLAMA_KERNEL_CACHE"
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, name) for name in ("tiles.cpp", "bf16_rows.cpp", "attention.cpp")]
_HEADERS = [os.path.join(_HERE, name) for name in ("parallel.h", "library.h")]  # (part of the build's key: a change rebuilds)


# ----------------------------------------------------------------------------- building
def _cache_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "codellama", "kernels")
    return root


def _compile(sources: List[str], target: str) -> None:
    """``sources`` → shared library ``target`` with g++ against torch's headers and libraries (no ninja, no pybind11)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "g++")
    libs = cpp_extension.library_paths()
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", *sources, "-o", target,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in cpp_extension.include_paths()], *[f"-L{p}" for p in libs],
           "-lc10", "-ltorch_cpu", *[f"-Wl,-rpath,{p}" for p in libs]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        errors = [line for line in lines if "error" in line] or lines
        raise RuntimeError(f"{compiler} failed: {errors[0].strip() if errors else 'no output'}")


def _library_path() -> str:
    """The cached build of the extension for this source and torch build, compiled first when missing."""
    digest = hashlib.sha256(torch.__version__.encode() + sys.version.encode())
    for source in _SOURCES + _HEADERS:
        with open(source, "rb") as f:
            digest.update(f.read())
    key = digest.hexdigest()[:16]
    directory = _cache_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"codellama_native-{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)  # another process may be building it too
        os.close(fd)
        try:
            _compile(_SOURCES, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


_loaded: List[Tuple[Dict[str, int], str]] = []  # what _load found, once per process


def _load() -> Tuple[Dict[str, int], str]:
    """``({kernel: isa}, reason)``: the instruction set each kernel runs with (0: it cannot run here), and why not."""
    if not _loaded:
        _loaded.append(_build_and_load())
    return _loaded[0]


def _build_and_load() -> Tuple[Dict[str, int], str]:
    none = {"int4": 0, "int8": 0, "bf16": 0}
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return none, f"{DISABLE_ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return none, f"they are written for x86-64, not {platform.machine()}"
    try:
        torch.ops.load_library(_library_path())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return none, f"building them failed ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})"
    _register_fake()
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY, as torch's kernels do
    allowed = 2 if capability.startswith("AVX512") else 1 if capability.startswith("AVX2") else 0
    ops = torch.ops.codellama_native
    integer = min(int(ops.supported_isa()), allowed)
    isas = {"int4": integer, "int8": integer, "bf16": min(int(ops.bf16_supported_isa()), allowed)}
    return isas, "" if any(isas.values()) else f"this CPU has no AVX2 (torch reports {capability})"


def _register_fake() -> None:
    @torch.library.register_fake("codellama_native::int4_tiles_linear")
    def _(x, tiles, sz, group_size, out_features, isa):
        return x.new_empty((x.shape[0], out_features), dtype=torch.float32)

    @torch.library.register_fake("codellama_native::int8_rows_linear")
    def _(x, w, scales, isa):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("codellama_native::quantize_int8")
    def _(w, isa):
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:1])

    @torch.library.register_fake("codellama_native::quantize_int4")
    def _(w, group_size, isa):
        groups = (w.shape[0], w.shape[1] // group_size)
        return w.new_empty((w.shape[0], w.shape[1] // 2), dtype=torch.uint8), w.new_empty(groups), w.new_empty(groups)

    @torch.library.register_fake("codellama_native::bf16_rows_linear")
    def _(x, w, isa, rows_a_step=0, out_dtype=None):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype or torch.float32)


_told = []


def available(kernel: str = "int4") -> bool:
    """Whether ``kernel`` (``"int4"``, ``"int8"`` or ``"bf16"``) runs here (built on first call); says once on stderr why not."""
    isas, why = _load()
    if not any(isas.values()) and not _told:
        _told.append(why)
        print(f"codellama: the native CPU kernels are unavailable ({why}): int4, int8 and bf16 layers use torch's",
              file=sys.stderr)
    return bool(isas[kernel])


def ops():
    """The extension's operators (``torch.ops.codellama_native``), loaded (and built) first."""
    _load()
    return torch.ops.codellama_native


def native_isa(kernel: str) -> int:
    """The instruction set ``kernel`` runs with: 2 (AVX-512), 1 (AVX2), 0 (unavailable)."""
    return _load()[0][kernel]


def isa(kernel: str = "int4") -> Optional[str]:
    """The instruction set ``kernel`` uses here (``"AVX-512 VNNI"``, ``"AVX-512 BF16"``, ``"AVX2"``), None when unavailable."""
    level = native_isa(kernel)
    return None if not level else "AVX2" if level == 1 else "AVX-512 BF16" if kernel == "bf16" else "AVX-512 VNNI"


from .int4 import int4_tiles, int4_tiles_linear, int4_tiles_reference, quantize_int4, untile_int4  # noqa: E402
from .int8 import int8_rows_linear, int8_rows_reference, quantize_int8  # noqa: E402
from .bf16 import bf16_all_finite, bf16_rows_linear, bf16_rows_reference  # noqa: E402

__all__ = ["available", "isa", "int4_tiles", "int4_tiles_linear", "int4_tiles_reference", "untile_int4",
           "quantize_int4", "int8_rows_linear", "int8_rows_reference", "quantize_int8",
           "bf16_all_finite", "bf16_rows_linear", "bf16_rows_reference"]
