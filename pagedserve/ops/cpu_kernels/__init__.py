"""pagedserve's CPU kernels: int4 and int8 matmuls with int8 activations, and the native
decoder built on them, compiled with the package and chosen at run time per instruction set.

A decode step of one sequence reads every weight for one multiply-add; torch's weight-only int4
kernel spends much of that time unpacking and converting. These kernels do what llama.cpp does
for Q4_1: weights held as Q4_1 blocks (float16 scale and minimum, 32 nibbles: 20 bytes per 32
weights), each group of 32 activations rounded to int8 with its own scale, integer multiply-adds
(AVX2 ``vpmaddubsw``, AVX-512 VNNI / AVX-VNNI ``vpdpbusd``); the LM head as Q8_0 blocks. Both in
tiles of 16 columns (``csrc/kernels.h`` draws the layout; :mod:`.packing` writes it), so one
instruction serves every column of a tile and no horizontal sums are needed. Weights keep the
grid of ``Linear.pack_low_bit`` (exact for Q4_1 and Q8_0 GGUF blocks), and a row's result does
not depend on the other rows of the step, so the kernels serve prompts too. On them,
:mod:`.decoder` runs every layer of a step in one call.

The parts:
- :mod:`.isa`: the variants (AVX-512 VNNI, AVX-VNNI, AVX2; ARM's place) and the probe of what
  the CPU and the OS allow;
- :mod:`.build`: compiling them, by ``setup.py`` at install time and, as a fallback, here;
- :mod:`.library`: one variant's library through ctypes (it links no torch and no Python);
- :mod:`.packing`, :mod:`.decoder`: weights into tiles, the decoder's layers by name;
- :mod:`.threads`: how many threads this process may use (affinity, cgroup quota);
- here: :func:`resolve`, which the engine calls once at start-up, and :class:`KernelWatch`,
  which hands a server that started without the kernels the ones a background build made,
  between two steps.

Choosing a variant: the best one the CPU and the OS allow (``csrc/probe.c``: CPUID and XGETBV)
whose library is found (in the package, else in the cache of run-time builds) and was built
from these sources, and whose self-test passes under a guard against illegal instructions.
``PAGEDSERVE_CPU_ISA`` forces one (tests, diagnosis).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedserve.ops.cpu_kernels import build, isa, packing
from pagedserve.ops.cpu_kernels.decoder import Decoder, LayerWeights
from pagedserve.ops.cpu_kernels.library import KernelError, KernelLibrary, KernelUnavailable

logger = logging.getLogger(__name__)

__all__ = ["Decoder", "KernelError", "KernelUnavailable", "KernelWatch", "Kernels",
           "KernelsNotBuilt", "LayerWeights", "Resolution", "available", "load", "resolve"]


class Kernels:
    """The kernels this process computes with: one variant's library, and the packing and the
    decoder in its geometry."""

    def __init__(self, library: KernelLibrary, features: frozenset[str]):
        self.library = library
        self.isa = library.isa
        self.geometry = library.geometry
        self.cpu_features = features  # what the probe found, for the log and the report

    def __repr__(self) -> str:
        return f"Kernels({self.isa}, {self.library.path})"

    def fits(self, n: int, k: int) -> bool:
        """Whether an (n, k) weight can be held in tiles."""
        return n % self.geometry.tile_columns == 0 and k % self.geometry.group == 0

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return packing.pack(weight, self.geometry)

    def pack_q8(self, weight: torch.Tensor) -> torch.Tensor:
        return packing.pack_q8(weight, self.geometry)

    def unpack(self, blocks: torch.Tensor):
        return packing.unpack(blocks, self.geometry)

    def unpack_q8(self, blocks: torch.Tensor):
        return packing.unpack_q8(blocks, self.geometry)

    def matmul(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) float32, W in :meth:`pack`'s tiles."""
        return self.library.q4_matmul(x, blocks)

    def matmul_q8(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) float32, W in :meth:`pack_q8`'s tiles."""
        return self.library.q8_matmul(x, blocks)

    def rows_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.max(x, dim=-1) of a float32 (B, V) on the kernels' pool: the greedy rows'
        choice."""
        return self.library.rows_max(x)

    def decoder(self, layers: list[LayerWeights], cos: torch.Tensor, sin: torch.Tensor,
                num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> Decoder:
        return Decoder(self.library, layers, cos, sin, num_heads, num_kv_heads, head_dim, eps)

    def set_threads(self, threads: int) -> None:
        self.library.set_threads(threads)


def search_dirs() -> list[Path]:
    """Where libraries are looked for: ``$PAGEDSERVE_KERNEL_DIR`` alone where it is set (its
    hash subdirectory), else the package, then the cache of run-time builds."""
    if os.environ.get("PAGEDSERVE_KERNEL_DIR"):
        return [build.cache_dir()]
    return [build.PACKAGE_DIR, build.cache_dir()]


@functools.cache
def _load_library(path: Path) -> KernelLibrary:
    return KernelLibrary(path)  # once per file: a library's pool lives as long as the process


@functools.cache
def _load_probe(path: Path) -> isa.Probe:
    return isa.Probe(path, build.source_hash())


class KernelsNotBuilt(KernelUnavailable):
    """No library built from these sources: a build would bring them."""


def _find(target: str, loader):
    """The first library of `target` in :func:`search_dirs` that loads; KernelsNotBuilt
    where none is built from these sources, KernelUnavailable with the reasons where one is
    but does not load."""
    reasons, stale = [], []
    for directory in search_dirs():
        path = directory / build.library_name(target)
        if not path.exists():
            continue
        try:
            return loader(path)
        except isa.StaleLibrary as exc:
            stale.append(str(exc))
        except (KernelUnavailable, OSError) as exc:
            reasons.append(str(exc))
    if reasons:
        raise KernelUnavailable("; ".join(reasons))
    raise KernelsNotBuilt("; ".join(stale) or f"the {target} library is not built")


_verdicts: dict[Path, int] = {}  # a library's self-test result, once per process


def load() -> Kernels:
    """The best variant this CPU allows whose library is built and passes its self-test
    (only ``$PAGEDSERVE_CPU_ISA``'s where set); raises KernelUnavailable saying why not."""
    variants = isa.variants_for()
    if not variants:
        raise KernelUnavailable(f"no CPU kernels for {isa.machine()} yet")
    probe = _find(build.PROBE, _load_probe)
    features = probe.features()
    forced = isa.forced()
    reasons, not_built = [], True
    for variant in variants:
        if forced is not None and variant.name != forced:
            continue
        if not isa.allowed(variant, features):
            missing = ", ".join(sorted(variant.requires - features))
            reasons.append(f"{variant.name}: this CPU or its OS does not allow {missing}")
            continue
        try:
            library = _find(variant.name, _load_library)
        except KernelsNotBuilt as exc:
            reasons.append(f"{variant.name}: {exc}")
            continue
        except KernelUnavailable as exc:
            reasons.append(f"{variant.name}: {exc}")
            not_built = False
            continue
        not_built = False
        if library.path not in _verdicts:
            _verdicts[library.path] = library.selftest(probe)
        if _verdicts[library.path] != 0:
            reasons.append(f"{variant.name}: its self-test failed on this CPU "
                           f"(code {_verdicts[library.path]})")
            continue
        return Kernels(library, features)
    if not_built and any(isa.allowed(v, features) for v in variants):
        raise KernelsNotBuilt("; ".join(reasons))
    raise KernelUnavailable("; ".join(reasons))


class KernelWatch:
    """A build of the kernels running in the background: :meth:`poll`, called between steps,
    returns them once it has finished (it looks at most once a second), else None."""

    POLL_INTERVAL_S = 1.0

    def __init__(self, process: subprocess.Popen):
        self._process = process
        self._next_look = 0.0
        self.done = False

    def poll(self) -> Kernels | None:
        now = time.monotonic()
        if self.done or now < self._next_look:
            return None
        self._next_look = now + self.POLL_INTERVAL_S
        if self._process.poll() is None:
            return None
        self.done = True
        try:
            return load()
        except KernelUnavailable as exc:
            logger.warning("the CPU kernels' background build left none usable (%s); staying "
                           "on torch's kernels", exc)
            return None


@dataclass(slots=True)
class Resolution:
    kernels: Kernels | None  # None: torch's kernels for now
    watch: KernelWatch | None = None  # a background build that may bring them


def resolve(setting: bool | None) -> Resolution:
    """The kernels an engine uses (``EngineConfig.native_kernels``). None: the built ones
    where usable; where none are built (a package installed without a compiler), a build in
    the background (:class:`KernelWatch`). True: build them now if needed, raise
    KernelUnavailable where they cannot be used. False: never."""
    if setting is False or not isa.variants_for():
        if setting:
            load()  # raises, saying why
        return Resolution(None)
    try:
        return Resolution(load())
    except KernelsNotBuilt:
        pass
    except KernelUnavailable as exc:
        if setting:
            raise
        logger.warning("the CPU kernels are unusable here (%s); using torch's", exc)
        return Resolution(None)
    if setting:
        build.build_for_this_cpu()  # raises KernelBuildError (a RuntimeError) saying why
        return Resolution(load())
    if build.compiler() is None:
        logger.info("the CPU kernels are not built and there is no C++ compiler to build them "
                    "(reinstall pagedserve where one is); using torch's kernels")
        return Resolution(None)
    try:
        process = build.build_in_background()
    except OSError as exc:
        logger.warning("could not start building the CPU kernels: %s", exc)
        return Resolution(None)
    logger.info("the CPU kernels are not built (pagedserve was installed without a C++ "
                "compiler?): compiling them in the background; this engine switches to them "
                "between two steps when they are ready")
    return Resolution(None, KernelWatch(process))


def available() -> bool:
    """Whether :func:`load` would succeed now."""
    try:
        load()
    except KernelUnavailable:
        return False
    return True
