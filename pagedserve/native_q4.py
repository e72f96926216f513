"""CPU kernels in C++ (AVX2): int4 and int8 matmuls with int8 activations, and the native
decoder built on them.

A decode step of one sequence reads every weight for one multiply-add; torch's weight-only int4
kernel spends much of that time unpacking and converting. ``native_q4.cpp`` does what llama.cpp
does for Q4_1: weights held as Q4_1 blocks (float16 scale and minimum, 32 nibbles: 20 bytes per
32 weights), each group of 32 activations rounded to int8 with its own scale, 32 multiply-adds
per integer instruction; and for the LM head Q8_0 blocks (a float16 scale per 32 int8). Both
come in tiles of 8 columns (:func:`pack`, :func:`pack_q8`) so that one instruction serves 8
columns and no horizontal sums are needed. The 120 layer matmuls of the bundled model take
~3 ms a token (the memory's rate on the 2-core AVX2 machine) against 9.9-12.5 ms with torch's
kernel, and many rows run at 240-330 G int ops/s against ~100 GFLOPS for dense float32
(docs/performance.md). Weights keep the grid of :meth:`Linear.pack_low_bit` (exact for Q4_1 and
Q8_0 GGUF blocks), and each row's result is independent of the other rows of the step, so the
kernels serve prompts too.

On them, ``Decoder`` (see :func:`decoder`) runs every layer of a decode-only step in one call
(norms, rotary, the paged KV write and attention, SwiGLU, residual adds, in float32), where the
same step op by op dispatched ~5,000 torch ops.

The library is built with ``-fopenmp``: ``at::parallel_for`` is OpenMP pragmas in an ATen
header, and without the flag every loop ran on one thread (``parallel_threads()`` tells).

The library is C++ compiled on this machine (about half a minute with the compiler torch's
extension builder would use), into ``~/.pagedserve/cache/kernels`` under a name that carries the
source's and torch's versions, written to a temporary file and renamed into place, so that a
build that is killed leaves nothing half-written and two builds at once do no harm. With
``EngineConfig.native_kernels`` None (the default) a start that finds the kernel built uses it;
one that does not starts the build in a process of its own, for the next start, and keeps
torch's kernel for its whole life (no step changes kernels mid-run). True builds it in the
foreground and fails if it cannot; False never uses it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from pagedserve.device import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_q4.cpp")
GROUP = 32


class NativeKernelUnavailable(RuntimeError):
    pass


def cpu_supports_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def cache_dir() -> Path:
    """``$PAGEDSERVE_KERNEL_DIR``, else ``$PAGEDSERVE_HOME/cache/kernels`` (``~/.pagedserve``)."""
    if os.environ.get("PAGEDSERVE_KERNEL_DIR"):
        return Path(os.environ["PAGEDSERVE_KERNEL_DIR"])
    home = os.environ.get("PAGEDSERVE_HOME") or Path.home() / ".pagedserve"
    return Path(home) / "cache" / "kernels"


@functools.cache
def module_name() -> str:
    """The source's hash with torch's and Python's versions: an edited kernel, another torch or
    another Python builds anew."""
    versions = f"{torch.__version__} {sys.implementation.cache_tag}".encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + versions).hexdigest()[:12]
    return f"pagedserve_native_q4_{digest}"


def library_path() -> Path:
    return cache_dir() / f"{module_name()}.so"


def is_built() -> bool:
    return library_path().exists()


def build() -> Path:
    """Compile the kernel (about half a minute on 2 cores); returns the library's path."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise NativeKernelUnavailable("no C++ compiler (c++ or g++) on PATH")
    name, target = module_name(), library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    libs = library_paths()
    fd, tmp = tempfile.mkstemp(prefix=name, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
           f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
           str(SOURCE), "-o", tmp, *[f"-L{p}" for p in libs],
           "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", *[f"-Wl,-rpath,{p}" for p in libs]]
    start = time.monotonic()
    try:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:  # CXX names no program, say
            raise NativeKernelUnavailable(f"could not run {compiler}: {exc}") from exc
        if result.returncode != 0:
            raise NativeKernelUnavailable(
                f"the kernel did not compile ({compiler}): {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a reader sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the AVX2 int4 kernel in %.1f s: %s", time.monotonic() - start, target)
    return target


@functools.cache
def load() -> ModuleType:
    """The compiled kernel, built first if needed; raises NativeKernelUnavailable."""
    if not cpu_supports_avx2():
        raise NativeKernelUnavailable("this CPU has no AVX2/FMA/F16C")
    path = library_path() if is_built() else build()
    name = module_name()
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as exc:
        raise NativeKernelUnavailable(f"the compiled kernel did not load: {exc}") from exc
    return module


def build_in_background() -> None:
    """Start the build in a process of its own (it outlives a short run), for the next start."""
    if not cpu_supports_avx2() or is_built():
        return
    code = "from pagedserve import native_q4; native_q4.build()"
    subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True,
                     preexec_fn=lambda: os.nice(19))
    logger.info("compiling the AVX2 int4 kernel in the background (about half a minute, once); "
                "starts after it use it for small steps")


def resolve(setting: bool | None) -> bool:
    """Whether this engine's small CPU steps use the kernel (``EngineConfig.native_kernels``)."""
    if setting is False:
        return False
    if setting:
        load()  # raises NativeKernelUnavailable with the reason
        return True
    if not cpu_supports_avx2():
        return False
    if not is_built():
        try:
            build_in_background()
        except OSError as exc:
            logger.warning("could not start compiling the AVX2 int4 kernel: %s", exc)
        return False
    try:
        load()
    except NativeKernelUnavailable as exc:
        logger.warning("small CPU steps use torch's int4 kernel: %s", exc)
        return False
    return True


def int4_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float32 weight -> q (N, K/32, 32) in 0..15, d and lo (N, K/32): each group of 32
    along K as lo + d * q, min/max-quantized like a Q4_0/Q4_1 GGUF block (so exact for
    weights that came from Q4_1 blocks). Both int4 copies of ``Linear`` use this grid."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"the input dimension ({k}) must be a multiple of {GROUP}")
    groups = weight.view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((groups - lo[..., None]) / d[..., None]).round().clamp(0, 15)
    return q, d, lo


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> (N/8, K/32, 160) uint8 blocks on :func:`int4_grid`'s grid: per tile of 8
    columns (rows of W) and group of 32 along K, the 8 columns' Q4_1 GGUF blocks (float16 d and
    lo, 32 q of 4 bits: 20 bytes each) arranged for AVX2: the 8 d, the 8 lo, then 4 vectors of
    32 bytes, vector v byte 4c + i holding column c's q at 8v + i (low nibble) and at 8v + 4 + i
    (high nibble). Exact for weights that came from Q4_1 blocks, whose d and lo are float16
    already. N must be a multiple of 8."""
    n, k = weight.shape
    if n % 8:
        raise ValueError(f"the output dimension ({n}) must be a multiple of 8")
    q, d, lo = int4_grid(weight.float())
    groups = k // GROUP
    # (tiles, 8 columns, groups, 4 vectors, 2 nibbles, 4 positions) -> (tiles, groups, v, c, i)
    q = q.to(torch.uint8).view(n // 8, 8, groups, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
    nibbles = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n // 8, groups, 128)
    scales = [t.half().view(n // 8, 8, groups).transpose(1, 2).contiguous().view(torch.uint8)
              for t in (d, lo)]  # (tiles, groups, 16) each
    return torch.cat([*scales, nibbles], -1).contiguous()


def unpack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pack`'s blocks (N/8, G, 160) -> q (N, G, 32) in 0..15, d and lo (N, G) float32."""
    tiles, groups, _ = blocks.shape
    d, lo = (blocks[..., a : a + 16].contiguous().view(torch.float16).float()
             .transpose(1, 2).reshape(tiles * 8, groups) for a in (0, 16))
    nibbles = blocks[..., 32:].reshape(tiles, groups, 4, 8, 4)  # (tile, g, v, c, i)
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], 4)  # (tile, g, v, c, 2, i)
    q = q.permute(0, 3, 1, 2, 4, 5).reshape(tiles * 8, groups, 32)
    return q, d, lo


def pack_q8(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> (N/8, K/32, 272) uint8 Q8_0 blocks for :func:`matmul_q8`: each group of 32
    along K as d * q, d = max|w| / 127 in float16, q in -127..127 (llama.cpp's Q8_0 grid, so exact
    for weights that came from Q8_0 blocks), in tiles of 8 columns as :func:`pack`'s: per group
    the 8 columns' float16 d, then 8 vectors of 32 bytes, vector j byte 4c + i holding column
    c's q at 4j + i. N must be a multiple of 8."""
    n, k = weight.shape
    if k % GROUP or n % 8:
        raise ValueError(f"the weight's shape {(n, k)} must be a multiple of (8, {GROUP})")
    groups = weight.float().view(n, k // GROUP, GROUP)
    d = (groups.abs().amax(-1) / 127).half()
    inverse = torch.where(d > 0, 1 / d.float(), 0.0)
    q = (groups * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)
    # (tiles, 8 columns, groups, 8 vectors, 4 positions) -> (tiles, groups, j, c, i)
    q = q.view(n // 8, 8, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // 8, k // GROUP, 256)
    scales = d.view(n // 8, 8, k // GROUP).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([scales, q.view(torch.uint8)], -1).contiguous()


def unpack_q8(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_q8`'s blocks (N/8, G, 272) -> q (N, G, 32) int8, d (N, G) float32."""
    tiles, groups, _ = blocks.shape
    d = blocks[..., :16].contiguous().view(torch.float16).float().transpose(1, 2)
    q = blocks[..., 16:].contiguous().view(torch.int8).reshape(tiles, groups, 8, 8, 4)
    q = q.permute(0, 3, 1, 2, 4).reshape(tiles * 8, groups, 32)
    return q, d.reshape(tiles * 8, groups)


def matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) float32."""
    return load().q4_matmul(x.float().contiguous(), blocks)


def matmul_q8(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) float32, W in :func:`pack_q8`'s blocks."""
    return load().q8_matmul(x.float().contiguous(), blocks)


def decoder(weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
            num_kv_heads: int, head_dim: int, eps: float):
    """The native decoder of small decode steps (``Decoder`` in native_q4.cpp, where the
    weights' order is documented): ``forward(x, positions, slots, seq_lens, block_tables,
    caches)`` runs every layer of a decode-only step of a few sequences in one call."""
    return load().Decoder(weights, cos.float().contiguous(), sin.float().contiguous(), num_heads,
                          num_kv_heads, head_dim, eps)
