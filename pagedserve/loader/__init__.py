"""Model files -> `LoadedModel`: config, weights under Hugging Face names, tokenizer.

Three sources share one result type:

- `gguf.py`: a llama.cpp GGUF file (dequantized to the runtime dtype, Q/K rows un-permuted);
- `hf.py`: a Hugging Face directory (config.json + safetensors, sharded or not);
- `dummy.py`: random weights of a given shape, for benchmarks.

Every failure a user can cause (missing file, corrupt or truncated file, unsupported
architecture or quantization, missing tensor) raises `ModelLoadError` with a message that
names the problem, so callers can print it without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.config import DTYPES
from pagedserve.loader.checks import expected_weight_names, expected_weight_shapes
from pagedserve.loader.formats import LoadFormat, detect_format, resolve_path
from pagedserve.loader.loaded_model import LoadedModel, ModelInfo, ModelLoadError

if TYPE_CHECKING:
    import torch

    from pagedserve.config import ModelConfig
    from pagedserve.parallel.tensor_shard import TensorShard

def load_model(
    path: str | Path | None,
    load_format: LoadFormat = "auto",
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    config: ModelConfig | None = None,
    device: str = "cpu",
    shard: TensorShard | None = None,
) -> LoadedModel:
    """Load config, weights (as `dtype`: a torch dtype or its name; default float32) and
    tokenizer from `path`.

    `load_format="dummy"` (implied by a ``dummy:NAME`` path) makes random weights on `device`
    shaped by `config`, by the named shape (``dummy:llama-3.1-8b``, see shapes.py) or by the
    config.json in `path` (path may be None when a config is given). Files load on the CPU.

    `shard`: only this tensor-parallel rank's part of each weight (tensor_shard.py), cut from
    each tensor as it is read, so that no rank ever holds the whole model.
    """
    import torch

    if dtype is None:
        dtype = torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got "
                             f"{dtype!r}")
        dtype = getattr(torch, dtype)
    if load_format == "dummy" or (isinstance(path, str) and path.startswith("dummy:")):
        from pagedserve.loader import dummy

        return dummy.load_dummy(path, config=config, dtype=dtype, device=device, shard=shard)
    if path is None:
        raise ModelLoadError("a model path is required unless load_format is 'dummy'")
    path, fmt = resolve_path(path, load_format)
    if fmt == "gguf":
        from pagedserve.loader import gguf

        return gguf.load_gguf(path, dtype=dtype, progress=progress, shard=shard)
    from pagedserve.loader import hf

    return hf.load_hf_dir(path, dtype=dtype, progress=progress, shard=shard)


def read_model_info(path: str | Path, load_format: LoadFormat = "auto") -> ModelInfo:
    """Metadata only: cheap enough to list many models."""
    path, fmt = resolve_path(path, load_format)
    if fmt == "gguf":
        from pagedserve.loader import gguf

        return gguf.read_gguf_info(path)
    if fmt == "dummy":
        from pagedserve.loader import dummy

        return dummy.dummy_info(path)
    from pagedserve.loader import hf

    return hf.read_hf_info(path)


__all__ = [
    "LoadFormat",
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "detect_format",
    "expected_weight_names",
    "expected_weight_shapes",
    "load_model",
    "read_model_info",
]
