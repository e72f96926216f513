"""The process's heap, as glibc's allocator counts it: what llguidance's grammars hold.

llguidance tells Python nothing about the memory of a grammar, and its memory does not follow
the grammar's text (a 7-byte regex can hold 20 MiB of lexer states once its first mask is
computed). glibc does know: ``mallinfo2`` sums the bytes in use in every arena, and the
compiler reads it before and after building a grammar in its worker thread. Other threads
allocate and free meanwhile, so the difference is an estimate, off by what the engine's step
had in flight; the compiler never takes less than a floor for it (see compiler.py).

Freed memory stays in glibc's arenas unless trimmed: after a refused grammar that had built
megabytes of lexer states, :func:`release_free_memory` hands the free pages back, so that the
server's RSS falls back to where it was. Elsewhere than glibc both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        logger.debug("glibc's mallinfo2 is not available: grammar sizes are estimated")
        return None
    return libc


def heap_in_use() -> int | None:
    """Bytes allocated and not freed, in all arenas and mmapped chunks; None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (glibc's ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
