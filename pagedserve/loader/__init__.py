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

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from pagedserve.config import ModelConfig
    from pagedserve.tokenizer import Tokenizer

LoadFormat = Literal["auto", "gguf", "safetensors", "dummy"]
GGUF_MAGIC = b"GGUF"


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


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config needs, in Hugging Face naming and (out, in) order,
    with its shape."""
    h, ff, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
    }
    if config.attention_bias:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)}
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(config.num_layers):
        shapes |= {f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()}
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def expected_weight_names(config: ModelConfig) -> list[str]:
    """Every tensor a model of this config needs, in Hugging Face naming."""
    return list(expected_weight_shapes(config))


def check_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Raise ModelLoadError naming the first missing tensor, or the first of the wrong shape."""
    from pagedserve.loader.checks import check_weight_shapes

    check_weight_shapes(source, config, {name: tuple(w.shape) for name, w in weights.items()})


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


def _resolve(path: str | Path, load_format: str) -> tuple[Path, str]:
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


def load_model(
    path: str | Path | None,
    load_format: LoadFormat = "auto",
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    config: ModelConfig | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load config, weights (as `dtype`: a torch dtype or its name; default float32) and
    tokenizer from `path`.

    `load_format="dummy"` (implied by a ``dummy:NAME`` path) makes random weights on `device`
    shaped by `config`, by the named shape (``dummy:llama-3.1-8b``, see shapes.py) or by the
    config.json in `path` (path may be None when a config is given). Files load on the CPU.
    """
    import torch

    if dtype is None:
        dtype = torch.float32
    elif isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if load_format == "dummy" or (isinstance(path, str) and path.startswith("dummy:")):
        from pagedserve.loader import dummy

        return dummy.load_dummy(path, config=config, dtype=dtype, device=device)
    if path is None:
        raise ModelLoadError("a model path is required unless load_format is 'dummy'")
    path, fmt = _resolve(path, load_format)
    if fmt == "gguf":
        from pagedserve.loader import gguf

        return gguf.load_gguf(path, dtype=dtype, progress=progress)
    from pagedserve.loader import hf

    return hf.load_hf_dir(path, dtype=dtype, progress=progress)


def read_model_info(path: str | Path, load_format: LoadFormat = "auto") -> ModelInfo:
    """Metadata only: cheap enough to list many models."""
    path, fmt = _resolve(path, load_format)
    if fmt == "gguf":
        from pagedserve.loader import gguf

        return gguf.read_gguf_info(path)
    if fmt == "dummy":
        from pagedserve.loader import dummy

        return dummy.dummy_info(path)
    from pagedserve.loader import hf

    return hf.read_hf_info(path)


__all__ = [
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "detect_format",
    "load_model",
    "read_model_info",
]
