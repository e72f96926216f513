"""Real models' shapes by name, for random-weight benchmarks: ``dummy:llama-3.1-8b``.

The numbers are those of each model's config.json (layers, widths, heads, vocabulary, rotary
base and scaling, context); only the weights are random (see ``dummy.py``). The two tiny ones
serve tests and the GPU check's CPU dry run.
"""

from __future__ import annotations

from pagedserve.config import ModelConfig
from pagedserve.loader.loaded_model import ModelLoadError

DUMMY_PREFIX = "dummy:"

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072),
    "llama-3.2-1b": ModelConfig(
        "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True),
    "llama-3.2-3b": ModelConfig(
        "llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True),
    "qwen2.5-7b": ModelConfig(
        "qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, attention_bias=True),
    "qwen2.5-0.5b": ModelConfig(
        "qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True),
    "tiny-llama": ModelConfig(
        "llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 64},
        max_position_embeddings=512),
    # the served check's dry run on a CPU: a tiny model whose vocabulary, like a real one, is
    # mostly multi-byte tokens (in 512 entries a random id is often a lone byte with no text)
    "tiny-llama-32k": ModelConfig(
        "llama", vocab_size=32768, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
        tie_word_embeddings=True),
    "tiny-qwen2": ModelConfig(
        "qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True),
}


def is_dummy_name(model: object) -> bool:
    return isinstance(model, str) and model.startswith(DUMMY_PREFIX)


def shape_for(name: str) -> ModelConfig:
    """``dummy:llama-3.1-8b`` (or just ``llama-3.1-8b``) -> a fresh ModelConfig of that shape."""
    import dataclasses

    key = name.removeprefix(DUMMY_PREFIX).lower()
    if key not in SHAPES:
        raise ModelLoadError(f"unknown dummy shape {name!r}; known: "
                         + ", ".join(DUMMY_PREFIX + k for k in SHAPES))
    config = SHAPES[key]
    return dataclasses.replace(config, rope_scaling=dict(config.rope_scaling)
                               if config.rope_scaling else None)
