"""Which loader reads a path: a GGUF file by its magic bytes, a Hugging Face directory by its
config.json, random weights by a ``dummy:`` name."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pagedserve.loader.loaded_model import ModelLoadError

LoadFormat = Literal["auto", "gguf", "safetensors", "dummy"]
GGUF_MAGIC = b"GGUF"


def detect_format(path: str | Path) -> str:
    """"gguf" for a GGUF file (or a directory holding exactly one and no config.json),
    "safetensors" for a Hugging Face directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        if path.suffix == ".gguf":
            raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
        raise ModelLoadError(f"{path} is neither a GGUF file nor a model directory")
    if (path / "config.json").is_file():
        return "safetensors"
    if len(list(path.glob("*.gguf"))) == 1:
        return "gguf"
    raise ModelLoadError(f"{path} has no config.json and no single .gguf file")


def resolve_path(path: str | Path, load_format: str) -> tuple[Path, str]:
    """The file to read (a directory's single .gguf) and its format."""
    if load_format not in ("auto", "gguf", "safetensors", "dummy"):
        raise ModelLoadError(
            f"load_format must be auto, gguf, safetensors or dummy, got {load_format!r}"
        )
    path = Path(path).expanduser()
    fmt = detect_format(path) if load_format == "auto" else load_format
    if fmt == "gguf" and path.is_dir():
        ggufs = list(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(f"{path} holds {len(ggufs)} .gguf files; name one")
        path = ggufs[0]
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    return path, fmt
