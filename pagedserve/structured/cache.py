"""Compiled grammars kept for reuse, bounded in entries and in bytes, least recently used out.

An entry is the ``Future`` of one constraint's compilation, so that requests for a grammar
still compiling wait for that compilation rather than start another. Its size is 0 while it
compiles and when it failed (a refusal keeps only its reason: sending a bad schema again costs
nothing), and the bytes its compiled grammar holds once done (:meth:`GrammarCache.settle`).
A grammar larger than ``max_entry_bytes`` is not kept: the requests waiting for it have it,
and it is freed with the last of them.

    entries   OrderedDict key -> (future, bytes), oldest first
    bytes     sum of the sizes: <= max_bytes after every call
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

Key = tuple[str, str]


class GrammarCache:
    """Not thread-safe: the compiler calls it under its lock."""

    def __init__(self, max_entries: int, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: OrderedDict[Key, tuple[Future, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> Future | None:
        """The entry's future (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def add(self, key: Key, future: Future[Any]) -> None:
        """Keep a compilation that has just started (size 0 until it settles)."""
        self.discard(key)
        self._entries[key] = (future, 0)
        self._evict()

    def settle(self, key: Key, num_bytes: int) -> bool:
        """Record the size of a finished compilation; False if it is too big to keep (it
        is then no longer cached)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if num_bytes > self.max_entry_bytes:
            self.discard(key)
            return False
        self.bytes += num_bytes - entry[1]
        self._entries[key] = (entry[0], num_bytes)
        self._evict(keep=key)
        return True

    def discard(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def _evict(self, keep: Key | None = None) -> None:
        """Drop the least recently used entries until both bounds hold (``keep`` last)."""
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            if oldest == keep:
                if len(self._entries) == 1:
                    break
                self._entries.move_to_end(keep)
                continue
            self.discard(oldest)
