"""A disk cache of dequantized GGUF weights, so that a second start skips dequantization.

Keyed by the GGUF's resolved path, size and modification time and the runtime dtype; stored as
one safetensors file under ``$PAGEDSERVE_HOME/cache/weights`` (default ``~/.pagedserve``),
written to a temporary name and renamed, so a crash never leaves a half file behind. Models
whose dequantized weights exceed ``PAGEDSERVE_WEIGHT_CACHE_MAX`` bytes (default 4 GiB) are not
cached; ``PAGEDSERVE_WEIGHT_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
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


def load(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    if not enabled():
        return None
    file = cache_file(path, dtype)
    if not file.is_file():
        return None
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        logger.warning("ignoring unreadable weight cache %s: %s", file, exc)
        return None


def store(path: Path, dtype: torch.dtype, weights: dict[str, torch.Tensor]) -> Path | None:
    if not enabled():
        return None
    size = sum(w.numel() * w.element_size() for w in weights.values())
    limit = int(os.environ.get("PAGEDSERVE_WEIGHT_CACHE_MAX", DEFAULT_MAX_BYTES))
    if size > limit:
        logger.info("not caching %.1f GiB of dequantized weights (limit %.1f GiB)",
                    size / 2**30, limit / 2**30)
        return None
    file = cache_file(path, dtype)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, tmp)
        tmp.replace(file)
    except OSError as exc:  # a read-only or full disk must not stop the model from loading
        logger.warning("could not write the weight cache %s: %s", file, exc)
        tmp.unlink(missing_ok=True)
        return None
    return file
