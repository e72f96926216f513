"""A disk cache of dequantized GGUF weights, so that a second start skips dequantization.

Keyed by the GGUF's resolved path, size and modification time and the runtime dtype; stored as
one safetensors file under ``$PAGEDSERVE_HOME/cache/weights`` (default ``~/.pagedserve``),
written to a temporary name and renamed, so a crash never leaves a half file behind.

The cache holds at most ``PAGEDSERVE_WEIGHT_CACHE_MAX`` bytes (default 4 GiB): a model whose
dequantized weights exceed it is not cached, and a new file pushes out the least recently used
ones (a load marks its file used). It never takes the last of a disk: a file is written only
where at least as much again stays free, and a write that fails all the same (a full or read-only
disk) leaves no file and does not stop the load. ``PAGEDSERVE_WEIGHT_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_VERSION = 1  # bump when the stored layout or the dequantization changes
DEFAULT_MAX_BYTES = 4 << 30


def enabled() -> bool:
    return os.environ.get("PAGEDSERVE_WEIGHT_CACHE", "1") not in ("0", "false", "no")


def cache_dir() -> Path:
    home = os.environ.get("PAGEDSERVE_HOME") or Path.home() / ".pagedserve"
    return Path(home) / "cache" / "weights"


def cache_file(path: Path, dtype: torch.dtype) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|v{_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / f"{path.stem}-{str(dtype).removeprefix('torch.')}-{digest}.safetensors"


def max_bytes() -> int:
    return int(os.environ.get("PAGEDSERVE_WEIGHT_CACHE_MAX", DEFAULT_MAX_BYTES))


def load(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    if not enabled():
        return None
    file = cache_file(path, dtype)
    if not file.is_file():
        return None
    try:
        weights = load_file(file)
    except (SafetensorError, OSError) as exc:
        logger.warning("ignoring unreadable weight cache %s: %s", file, exc)
        return None
    try:
        os.utime(file)  # used now: the last to be pushed out
    except OSError:
        pass
    return weights


def store(path: Path, dtype: torch.dtype, weights: dict[str, torch.Tensor]) -> Path | None:
    if not enabled():
        return None
    size = sum(w.numel() * w.element_size() for w in weights.values())
    limit = max_bytes()
    if size > limit:
        logger.info("not caching %.1f GiB of dequantized weights (limit %.1f GiB)",
                    size / 2**30, limit / 2**30)
        return None
    file = cache_file(path, dtype)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        _make_room(file.parent, size, limit, keep=file)
        free = shutil.disk_usage(file.parent).free
        if free < 2 * size:
            logger.info("not caching %.0f MiB of dequantized weights: %.0f MiB free on %s",
                        size / 2**20, free / 2**20, file.parent)
            return None
        save_file(weights, tmp)
        tmp.replace(file)
    except (OSError, SafetensorError) as exc:
        # a full or read-only disk must not stop the model from loading (safetensors reports
        # its own write errors as SafetensorError, not OSError)
        logger.warning("could not write the weight cache %s: %s", file, exc)
        tmp.unlink(missing_ok=True)
        return None
    return file


def _make_room(directory: Path, size: int, limit: int, keep: Path) -> None:
    """Deletes the least recently used cache files until `size` more bytes fit under `limit`;
    also the leftovers of writes that died (``*.tmp<pid>``)."""
    entries = []
    for file in directory.iterdir():
        if file == keep or not file.is_file():
            continue
        if ".tmp" in file.suffix and not _pid_alive(file.suffix.removeprefix(".tmp")):
            file.unlink(missing_ok=True)
        elif file.suffix == ".safetensors":
            stat = file.stat()
            entries.append((stat.st_mtime, stat.st_size, file))
    total = sum(size for _, size, _ in entries)
    for _, used, file in sorted(entries):
        if total + size <= limit:
            break
        logger.info("weight cache: removing %s (least recently used)", file.name)
        file.unlink(missing_ok=True)
        total -= used


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
