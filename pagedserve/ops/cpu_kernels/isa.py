"""The instruction-set variants of the CPU kernels, and which of them this CPU and OS allow.

Each variant is the same source (``csrc/kernels.cpp``) compiled with its own flags into a
library of its own, built with the package (``setup.py``) or, failing that, at run time
(:mod:`.build`). Which one a process uses is decided here, from the CPU itself, never from the
machine that compiled it: ``csrc/probe.c`` asks CPUID what the silicon has and XGETBV what
register state the OS saves, and the caller then runs a variant's self-test under a guard
(:meth:`Probe.run_guarded`) before choosing it, so a CPU that lists an instruction set the OS
has not enabled (a virtual machine listing AMX, say) costs a fallback, not a crash.

``PAGEDSERVE_CPU_ISA=avx2`` (any variant's name) forces that variant: tests run every variant
this CPU can run against the reference that way, and a user can rule out a suspect one.

Other architectures: an ARM NEON variant is a row of :data:`VARIANTS` with machine
``aarch64`` (flags ``-march=armv8.2-a+dotprod``, its feature from ``getauxval(AT_HWCAP)`` in
probe.c) and its tiles in ``csrc/tiles_neon.h``; nothing else changes. AMX (``amx_int8`` below)
is detected but not used: its tiles need ``arch_prctl(ARCH_REQ_XCOMP_PERM)`` first and pay only
for steps of many rows.

Imports nothing outside the standard library: ``setup.py`` reads this file before pagedserve
or torch is installed.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

FORCE_ENV = "PAGEDSERVE_CPU_ISA"

# bit -> name, as csrc/probe.c's PS_F_* (only features both the CPU and the OS allow)
FEATURES = {0: "avx2", 1: "fma", 2: "f16c", 3: "avx512f", 4: "avx512bw", 5: "avx512vl",
            6: "avx512vnni", 7: "avxvnni", 8: "amx_int8"}

_AVX2 = ("-mavx2", "-mfma", "-mf16c")


@dataclass(frozen=True, slots=True)
class Variant:
    name: str  # the library's suffix and PAGEDSERVE_CPU_ISA's value
    machine: str  # the architecture it is compiled for (normalized platform.machine())
    flags: tuple[str, ...]  # compiler flags of this instruction set
    requires: frozenset[str]  # the probe's features it needs

    @property
    def define(self) -> str:
        return f"-DPS_ISA_{self.name.upper()}"


# in order of preference: the first this CPU allows and whose self-test passes is used
VARIANTS = (
    Variant("avx512vnni", "x86_64",
            (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
            frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"})),
    Variant("avxvnni", "x86_64", (*_AVX2, "-mavxvnni"),
            frozenset({"avx2", "fma", "f16c", "avxvnni"})),
    Variant("avx2", "x86_64", _AVX2, frozenset({"avx2", "fma", "f16c"})),
)


def machine() -> str:
    """This process's architecture, as :attr:`Variant.machine` names it."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


def variants_for(arch: str | None = None) -> tuple[Variant, ...]:
    """The variants compiled for an architecture (this one by default), best first."""
    arch = arch or machine()
    return tuple(v for v in VARIANTS if v.machine == arch)


def forced() -> str | None:
    """``$PAGEDSERVE_CPU_ISA``, checked: a variant's name, or None."""
    name = os.environ.get(FORCE_ENV, "").strip().lower()
    if not name:
        return None
    known = [v.name for v in VARIANTS]
    if name not in known:
        raise ValueError(f"{FORCE_ENV} must be one of {', '.join(known)}, got {name!r}")
    return name


class StaleLibrary(OSError):
    """A library built from other sources than these (an editable install edited since)."""


class Probe:
    """``csrc/probe.c``, loaded: the CPU's usable features, and a guarded call."""

    def __init__(self, path: Path, source_hash: str):
        self._lib = ctypes.CDLL(str(path))
        self._lib.ps_probe_source_hash.restype = ctypes.c_char_p
        built_from = self._lib.ps_probe_source_hash().decode()
        if built_from != source_hash:
            raise StaleLibrary(f"{path} was built from other sources ({built_from}, these are "
                               f"{source_hash})")
        self._lib.ps_probe_features.restype = ctypes.c_uint32
        self._lib.ps_probe_run_guarded.restype = ctypes.c_int
        self._lib.ps_probe_run_guarded.argtypes = [ctypes.c_void_p]

    def features(self) -> frozenset[str]:
        bits = self._lib.ps_probe_features()
        return frozenset(name for bit, name in FEATURES.items() if bits >> bit & 1)

    def run_guarded(self, function) -> int:
        """``function()`` (a ctypes function of no arguments returning int): its result, or
        -1000 - the signal's number where it faulted (SIGILL: an instruction refused)."""
        return self._lib.ps_probe_run_guarded(ctypes.cast(function, ctypes.c_void_p))


def allowed(variant: Variant, features: frozenset[str]) -> bool:
    return variant.machine == machine() and variant.requires <= features
