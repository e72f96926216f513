"""What a model file says, checked before anything is sized by it.

A model file is input from whoever wrote it. Every count, dimension and length in it is checked
for type and range before the loader allocates by it, so that a corrupt or hostile file ends in
a `ModelLoadError` whose one-line message names the key and the value found, never in a
ZeroDivisionError, a RecursionError or a 17 GB allocation. Both loaders use these:

- `integer`, `number`, `text`, `flag`: one value, named by its key;
- `checked_config`, `checked_rope_scaling`: the ModelConfig fields together (ranges, heads
  dividing the width, rotary parameters), each named by the key its file spells it with;
- `check_layer_count`, `check_weight_shapes`: the config against the tensors the file lists;
- `check_fits`: the memory the weights and the rotary tables will take against what the
  machine has, before either is allocated.

The static bounds are far beyond any released model (Llama 3.1 405B: width 16384, 126 layers,
128 heads, a vocabulary of 128256, a context of 131072; the longest contexts are about 10M)
and exist only so that nothing downstream multiplies by 2**32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedserve.config import ModelConfig
from pagedserve.loader.loaded_model import ModelLoadError

if TYPE_CHECKING:
    import torch

    from pagedserve.parallel.tensor_shard import TensorShard

MAX_WIDTH = 1 << 20  # hidden size, FFN size, heads x head_dim
MAX_VOCAB = 1 << 24
MAX_LAYERS = 1 << 16
MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 26
# The rotary tables (models/llama.py `Rotary`) are float32 (positions, head_dim / 2) angles,
# their cos and sin, and those cast to the runtime dtype: about 8 bytes per position and dim.
ROTARY_BYTES_PER_POSITION_DIM = 8


def describe(value: Any) -> str:
    """A metadata value for a one-line message: arrays by their length, long text cut."""
    if isinstance(value, (list, tuple)) or hasattr(value, "shape"):
        return f"an array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 48 else text[:44] + "...'"
    return repr(value)


def _bounds(lo: float, hi: float | None) -> str:
    return f">= {lo}" if hi is None else f"between {lo} and {hi}"


def integer(source: str, key: str, value: Any, lo: int = 0, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]; a float with no fraction counts (some config.json
    writers emit 64.0), a bool does not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # a numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi):
        raise ModelLoadError(f"{source}: {key} must be an integer {_bounds(lo, hi)}, "
                             f"found {describe(value)}")
    return value


def number(source: str, key: str, value: Any, lo: float, hi: float | None = None,
           above: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] when `above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < lo or (above and value == lo) or (hi is not None and value > hi):
        limits = f"> {lo}" if above and hi is None else _bounds(lo, hi)
        raise ModelLoadError(f"{source}: {key} must be a finite number {limits}, "
                             f"found {describe(value)}")
    return float(value)


def text(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ModelLoadError(f"{source}: {key} must be a string, found {describe(value)}")
    return value


def flag(source: str, key: str, value: Any) -> bool:
    """A bool; 0 and 1 pass as one (GGUF writers have used u8 for flags)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ModelLoadError(f"{source}: {key} must be true or false, found {describe(value)}")


# ---------------------------------------------------------------------------------------------
# The config as a whole


@dataclass(slots=True)
class ConfigKeys:
    """How one file format spells each ModelConfig field, for the messages."""

    vocab_size: str
    hidden_size: str
    intermediate_size: str
    num_layers: str
    num_heads: str
    num_kv_heads: str
    head_dim: str
    rms_norm_eps: str
    rope_theta: str
    rope_scaling: str
    max_position_embeddings: str


def checked_config(source: str, keys: ConfigKeys, *, architecture: str, vocab_size: Any,
                   hidden_size: Any, intermediate_size: Any, num_layers: Any, num_heads: Any,
                   num_kv_heads: Any, head_dim: Any, rms_norm_eps: Any, rope_theta: Any,
                   rope_scaling: dict | None, max_position_embeddings: Any,
                   tie_word_embeddings: bool, attention_bias: bool) -> ModelConfig:
    """A ModelConfig from values read as found; `head_dim` None: hidden_size / num_heads,
    `num_kv_heads` None: num_heads. Raises ModelLoadError naming the first bad key."""
    hidden = integer(source, keys.hidden_size, hidden_size, 1, MAX_WIDTH)
    heads = integer(source, keys.num_heads, num_heads, 1, MAX_HEADS)
    kv_heads = heads if num_kv_heads is None else integer(
        source, keys.num_kv_heads, num_kv_heads, 1, heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: {keys.num_heads} ({heads}) must be a multiple of "
                             f"{keys.num_kv_heads} ({kv_heads})")
    if head_dim is None:
        if hidden % heads:
            raise ModelLoadError(f"{source}: {keys.hidden_size} ({hidden}) must be a multiple "
                                 f"of {keys.num_heads} ({heads}) when {keys.head_dim} is not set")
        dim = hidden // heads
        dim_key = f"{keys.hidden_size} / {keys.num_heads}"
    else:
        dim = integer(source, keys.head_dim, head_dim, 2, MAX_WIDTH // heads)
        dim_key = keys.head_dim
    if dim % 2:
        raise ModelLoadError(f"{source}: {dim_key} must be even for rotary embeddings, "
                             f"found {dim}")
    return ModelConfig(
        architecture=architecture,
        vocab_size=integer(source, keys.vocab_size, vocab_size, 1, MAX_VOCAB),
        hidden_size=hidden,
        intermediate_size=integer(source, keys.intermediate_size, intermediate_size, 1,
                                  MAX_WIDTH),
        num_layers=integer(source, keys.num_layers, num_layers, 1, MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=dim,
        rms_norm_eps=number(source, keys.rms_norm_eps, rms_norm_eps, 0.0, 1.0),
        # theta <= 1 makes every wavelength equal or shrinking: no trained model has it
        rope_theta=number(source, keys.rope_theta, rope_theta, 1.0, above=True),
        rope_scaling=checked_rope_scaling(source, keys.rope_scaling, rope_scaling),
        max_position_embeddings=integer(source, keys.max_position_embeddings,
                                        max_position_embeddings, 1, MAX_CONTEXT),
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
    )


def checked_rope_scaling(source: str, key: str, scaling: Any) -> dict | None:
    """HF's rope_scaling dict: its numbers finite and positive, llama3's band well ordered."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{source}: {key} must be an object, found {describe(scaling)}")
    kind = scaling.get("rope_type")
    if not isinstance(kind, str):
        raise ModelLoadError(f"{source}: {key}.rope_type must be a string, "
                             f"found {describe(kind)}")
    checked = dict(scaling)
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
        if name in scaling:
            checked[name] = number(source, f"{key}.{name}", scaling[name], 0.0, above=True)
    if "original_max_position_embeddings" in scaling:
        checked["original_max_position_embeddings"] = integer(
            source, f"{key}.original_max_position_embeddings",
            scaling["original_max_position_embeddings"], 1, MAX_CONTEXT)
    if kind in ("linear", "llama3", "yarn", "dynamic") and "factor" not in scaling:
        raise ModelLoadError(f"{source}: {key} of type {kind!r} has no factor")
    low, high = checked.get("low_freq_factor", 1.0), checked.get("high_freq_factor", 4.0)
    if kind == "llama3" and high <= low:
        raise ModelLoadError(f"{source}: {key}.high_freq_factor ({high}) must exceed "
                             f"low_freq_factor ({low})")
    return checked


# ---------------------------------------------------------------------------------------------
# The config against the tensors


def check_layer_count(source: str, key: str, layers: int, tensors: int) -> None:
    """Each layer has at least 9 tensors: more layers than the file can hold is a lie, caught
    before anything makes a list of their names."""
    if layers * 9 > tensors:
        raise ModelLoadError(f"{source}: {key} is {layers}, which needs at least "
                             f"{layers * 9} tensors; the file has {tensors}")


def check_weight_shapes(source: str, config: ModelConfig, found: dict[str, tuple[int, ...]],
                        file_names: dict[str, str] | None = None) -> None:
    """Every tensor the config needs, present and of its shape, by the shapes a file lists
    (Hugging Face names and (out, in) order); `file_names` gives the file's own names for the
    message."""
    expected = expected_weight_shapes(config)
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        name = (file_names or {}).get(missing[0], missing[0])
        raise ModelLoadError(f"{source} is missing tensor {name!r}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            shown = (file_names or {}).get(name, name)
            raise ModelLoadError(f"{source}: tensor {shown!r} has shape {tuple(found[name])}, "
                                 f"but the config needs {shape}")


# ---------------------------------------------------------------------------------------------
# Memory


def available_memory() -> int | None:
    """Bytes this process could still allocate: the kernel's MemAvailable plus free swap,
    less what an address-space limit (ulimit -v) leaves; None where neither is known."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                    if line.startswith(("MemAvailable:", "SwapFree:"))}
        if "MemAvailable" in info:
            limits.append(info["MemAvailable"] + info.get("SwapFree", 0))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        resource = None
    if resource is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(max(0, soft - _address_space_used()))
    return min(limits) if limits else None


def _address_space_used() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def check_fits(source: str, config: ModelConfig, context_key: str, weight_bytes: int,
               dtype_name: str) -> None:
    """The weights at the runtime dtype and the rotary tables for every position the config
    claims, against the memory available now; raises before either is allocated."""
    available = available_memory()
    if available is None:
        return
    rotary = (config.max_position_embeddings * config.head_dim
              * ROTARY_BYTES_PER_POSITION_DIM)
    if rotary > available:
        raise ModelLoadError(
            f"{source}: {context_key} is {config.max_position_embeddings}, whose rotary "
            f"tables need {_size(rotary)}; {_size(available)} of memory is available")
    if weight_bytes + rotary > available:
        raise ModelLoadError(
            f"{source}: its weights need {_size(weight_bytes)} in {dtype_name}; "
            f"{_size(available)} of memory is available")


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
    check_weight_shapes(source, config, {name: tuple(w.shape) for name, w in weights.items()})


def check_shard_weights(weights: dict[str, torch.Tensor], config: ModelConfig,
                        shard: TensorShard, source: str) -> None:
    """As :func:`check_weights`, for one tensor-parallel rank's part of each tensor."""
    for name, shape in expected_weight_shapes(config).items():
        if name not in weights:
            raise ModelLoadError(f"{source}: missing tensor {name}")
        expected = shard.shape_of(name, shape, config)
        if tuple(weights[name].shape) != expected:
            raise ModelLoadError(f"{source}: tensor {name} has shape "
                                 f"{tuple(weights[name].shape)} on rank {shard.rank}, "
                                 f"expected {expected}")
