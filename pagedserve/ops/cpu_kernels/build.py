"""Compiling the CPU kernels: the one set of commands ``setup.py`` runs when the package is
built or installed (editable too) and the run-time fallback runs where the package came without
them (no compiler at install time, or sources edited since).

What gets built, per architecture: ``_probe`` (``csrc/probe.c``, no instruction-set flags) and
one ``_kernels_<variant>`` per row of :data:`.isa.VARIANTS` (``csrc/kernels.cpp`` and
``csrc/thread_pool.cpp`` with the variant's flags). The libraries link only the C++ runtime:
not torch, not Python, so one build serves any torch and any Python of the machine, and a build
takes seconds (~4 s of CPU a variant). Each carries the hash of the sources it was compiled
from (``ps_source_hash``): a library whose hash is not the sources' is stale and not loaded.

Where they live:
- with the package: ``pagedserve/ops/cpu_kernels/_kernels_avx2<EXT_SUFFIX>`` etc., put there by
  ``pip install`` (or in the source tree by ``pip install -e .``);
- built at run time: ``$PAGEDSERVE_KERNEL_DIR/<hash>/``, else
  ``$PAGEDSERVE_HOME/cache/kernels/<hash>/`` (``~/.pagedserve`` by default). Each library is
  written to a temporary file and renamed into place: a killed build leaves nothing
  half-written, two builds at once do no harm.

Imports nothing outside the standard library (and :mod:`.isa`), so that ``setup.py`` can run it
before torch or pagedserve is installed; ``python -m pagedserve.ops.cpu_kernels.build [DIR]`` builds
this machine's libraries into DIR (the cache by default): the background build.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:
    from pagedserve.ops.cpu_kernels import isa
else:  # loaded by setup.py from the source tree, before the package is installed
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_pagedserve_isa",
                                                   Path(__file__).with_name("isa.py"))
    isa = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = isa  # dataclasses look their module up while building the class
    _spec.loader.exec_module(isa)

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
PROBE = "probe"  # the target names: PROBE and each variant's name
KERNEL_SOURCES = ("kernels.cpp", "thread_pool.cpp")


class KernelBuildError(RuntimeError):
    """A library could not be compiled; the message says why (the compiler's last words)."""


@functools.cache
def source_hash() -> str:
    """12 hex digits over every file of csrc/ (names and bytes): an edit builds anew."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def library_name(target: str) -> str:
    """The file name of a target's library: a Python extension's, as setuptools names it."""
    stem = "_probe" if target == PROBE else f"_kernels_{target}"
    return stem + importlib.machinery.EXTENSION_SUFFIXES[0]


def cache_root() -> Path:
    """``$PAGEDSERVE_KERNEL_DIR``, else ``$PAGEDSERVE_HOME/cache/kernels`` (``~/.pagedserve``)."""
    if os.environ.get("PAGEDSERVE_KERNEL_DIR"):
        return Path(os.environ["PAGEDSERVE_KERNEL_DIR"])
    home = os.environ.get("PAGEDSERVE_HOME") or Path.home() / ".pagedserve"
    return Path(home) / "cache" / "kernels"


def cache_dir() -> Path:
    """Where run-time builds of these sources go."""
    return cache_root() / source_hash()


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def command(target: str, output: Path, cxx: str) -> list[str]:
    """The compiler's command line for one target."""
    if target == PROBE:
        return [cxx, "-x", "c", "-O2", "-fPIC", "-shared", f'-DPS_SOURCE_HASH="{source_hash()}"',
                str(SOURCE_DIR / "probe.c"), "-o", str(output)]
    [variant] = [v for v in isa.VARIANTS if v.name == target]
    # -ffp-contract=off: no multiply-add fused where the source did not ask for one, so that
    # every variant rounds the decoder's float work alike (their results are compared bit for
    # bit); the matmul tiles ask for theirs explicitly
    return [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
            "-ffp-contract=off", "-pthread", "-w", *variant.flags, variant.define,
            f'-DPS_SOURCE_HASH="{source_hash()}"',
            *[str(SOURCE_DIR / name) for name in KERNEL_SOURCES], "-o", str(output)]


def compile_library(target: str, output: Path) -> Path:
    """Compile one target into `output`, atomically; raises KernelBuildError."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler (c++ or g++) on PATH")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=output.name, suffix=".tmp", dir=output.parent)
    os.close(fd)
    start = time.monotonic()
    try:
        try:
            result = subprocess.run(command(target, Path(tmp), cxx), capture_output=True,
                                    text=True)
        except OSError as exc:  # CXX names no program, say
            raise KernelBuildError(f"could not run {cxx}: {exc}") from exc
        if result.returncode != 0:
            raise KernelBuildError(f"the {target} kernels did not compile ({cxx}): "
                                   f"{result.stderr.strip()[-2000:]}")
        os.replace(tmp, output)  # atomic: a reader sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the %s CPU kernels in %.1f s: %s", target, time.monotonic() - start,
                output)
    return output


def build_for_this_cpu(directory: Path | None = None) -> list[Path]:
    """The probe, then every variant this CPU allows (the others it could never run), into
    `directory` (:func:`cache_dir` by default); returns what was built. Raises
    KernelBuildError if the probe or every variant failed."""
    directory = directory or cache_dir()
    probe_path = directory / library_name(PROBE)
    if not probe_path.exists():
        compile_library(PROBE, probe_path)
    features = isa.Probe(probe_path, source_hash()).features()
    built, errors = [probe_path], []
    for variant in isa.variants_for():
        if not isa.allowed(variant, features):
            continue
        path = directory / library_name(variant.name)
        try:
            built.append(path if path.exists() else compile_library(variant.name, path))
        except KernelBuildError as exc:
            errors.append(str(exc))
    if len(built) == 1:
        raise KernelBuildError("; ".join(errors) or "this CPU allows none of the variants")
    return built


def build_in_background() -> subprocess.Popen:
    """:func:`build_for_this_cpu` in a process of its own, at the lowest priority (it outlives
    a short run); a server that started without the kernels picks them up when it lands."""
    return subprocess.Popen([sys.executable, "-m", "pagedserve.ops.cpu_kernels.build"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: os.nice(19))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_for_this_cpu(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
