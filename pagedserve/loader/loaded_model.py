"""What every loader returns (`LoadedModel`, `ModelInfo`) and raises (`ModelLoadError`).

Its own module, below the loaders and the dispatch in ``loader/__init__.py``, so that each
loader imports it without importing the package that imports the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pagedserve.config import ModelConfig
    from pagedserve.tokenizer import Tokenizer


class ModelLoadError(Exception):
    """A model could not be loaded; the message says what was found and what is wrong."""


@dataclass(slots=True)
class ModelInfo:
    """What a model file is, read from metadata alone (no tensor data touched)."""

    path: Path
    format: str  # "gguf" | "safetensors" | "dummy"
    quantization: str  # "Q4_1", "Q8_0", "F16", "BF16", "F32", ...
    family: str  # "llama", "qwen2", ...
    architecture: str  # as the file names it: "llama", "LlamaForCausalLM", ...
    parameter_count: int
    context_length: int
    file_size: int  # bytes on disk (all shards)
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-able


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face names, (out_features, in_features)
    tokenizer: Tokenizer | None
    info: ModelInfo
    generation_config: dict[str, Any] = field(default_factory=dict)


class tensor_progress:  # noqa: N801 (used like a function: `with tensor_progress(...) as advance`)
    """A transient rich progress bar over `total` tensors when enabled, else a no-op;
    entering yields the `advance()` callable."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._progress.__enter__()
        task = self._progress.add_task(f"loading {self.label}", total=self.total)
        return lambda: self._progress.advance(task)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
