"""Whether Triton kernels can launch on this machine, decided once at start-up.

Triton turns each kernel's launcher into a small C extension the first time the kernel runs,
compiled with the C compiler it finds (``$CC``, else ``gcc``, else ``clang`` on ``PATH``) against
Python's headers. An image without a compiler therefore loads the model and then fails at the
first forward pass (the CUDA memory-profiling pass), well after start-up looked fine.

:func:`launch_problem` does the same work first: it compiles a trivial extension the way Triton
does (same compiler lookup, same include directory, no cache, so an earlier run's cached
launchers cannot hide a missing compiler) and, on a CUDA device, launches a one-element kernel.
The execution plan (:mod:`pagedserve.worker.execution_plan`) asks it once, at start-up; when it
names a problem the plan keeps the torch kernels for the engine's whole life, and the reason is
logged once.
Under ``TRITON_INTERPRET=1`` (CPU tests) nothing is compiled, and it is not asked.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 120

# A Python extension module with nothing in it: compiling and linking it needs what Triton's
# launcher stubs need (a C compiler, Python.h, a linker).
_PROBE_SOURCE = """\
#include <Python.h>
static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "pagedserve_triton_probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_pagedserve_triton_probe(void) { return PyModule_Create(&probe); }
"""


@functools.cache
def launch_problem(device_type: str = "cuda") -> str | None:
    """None when Triton kernels launch on ``device_type``; otherwise why they cannot, logged
    once per process (every later call returns the same answer without a word)."""
    problem = compile_problem()
    if problem is None and device_type == "cuda":
        problem = _kernel_problem()
    if problem is not None:
        logger.warning("Triton kernels cannot launch here (%s); the model runs its torch "
                       "kernels instead (attention and the decoder's elementwise ops)", problem)
    return problem


def find_c_compiler() -> str | None:
    """The compiler Triton would use: ``$CC``, else gcc, else clang on PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def compile_problem() -> str | None:
    """Build the probe extension as Triton builds a launcher; None when that works."""
    compiler = find_c_compiler()
    if compiler is None:
        return "no C compiler: CC is unset and neither gcc nor clang is on PATH"
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":  # Debian's system Python, as Triton handles it
        scheme = "posix_prefix"
    include = sysconfig.get_paths(scheme=scheme)["include"]
    with tempfile.TemporaryDirectory(prefix="pagedserve-triton-probe-") as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text(_PROBE_SOURCE)
        cmd = [compiler, str(source), "-O1", "-shared", "-fPIC", f"-I{include}", "-o",
               str(Path(tmp) / "probe.so")]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True,
                                    timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"the C compiler {compiler} did not run: {exc}"
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        return f"the C compiler {compiler} failed: {tail[0]}"
    return None


@triton.jit
def _fill(out_ptr, value):
    tl.store(out_ptr, value)


def _kernel_problem() -> str | None:
    """Compile and launch a one-element kernel on the current CUDA device."""
    try:
        out = torch.zeros(1, device="cuda")
        _fill[(1,)](out, 1.0)
        torch.cuda.synchronize()
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError, TritonError) as exc:
        return f"a test kernel did not launch: {type(exc).__name__}: {exc}"
    if out.item() != 1.0:
        return "a test kernel ran but wrote nothing"
    return None
