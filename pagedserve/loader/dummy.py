"""Random weights of a real model's shapes, for benchmarks where only speed matters.

Weights are drawn from a seeded generator, so two loads of the same config are equal. Their
scale (std 0.02, norms at 1) keeps activations finite through many layers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pagedserve.config import ModelConfig
from pagedserve.loader.checks import expected_weight_shapes
from pagedserve.loader.loaded_model import LoadedModel, ModelInfo, ModelLoadError
from pagedserve.loader.shapes import is_dummy_name, shape_for
from pagedserve.parallel.tensor_shard import TensorShard

logger = logging.getLogger(__name__)


def _config_from(path: str | Path | None, config: ModelConfig | None) -> ModelConfig:
    if config is not None:
        return config
    if is_dummy_name(path):
        return shape_for(path)
    if path is None:
        raise ModelLoadError("load_format 'dummy' needs a ModelConfig or a config.json path")
    from pagedserve.loader.hf import model_config_from_hf, read_config_json

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    return model_config_from_hf(read_config_json(path), source=str(path))


def dummy_weights(config: ModelConfig, dtype: torch.dtype = torch.float32,
                  seed: int = 0, device: str | torch.device = "cpu",
                  shard: TensorShard | None = None) -> dict[str, torch.Tensor]:
    """Made where they will be used: on a GPU, an 8B model never passes through host memory.
    The same seed gives the same weights on the same device (CPU and CUDA generators differ).
    `shard`: each tensor is drawn whole (the same numbers at any tensor_parallel_size) and
    cut to this rank's part before the next is drawn."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in expected_weight_shapes(config).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        elif device.type == "cpu":
            weights[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        else:  # drawn in the target dtype: no float32 copy of a large matrix on the device
            weights[name] = torch.randn(shape, generator=generator, dtype=dtype,
                                        device=device).mul_(0.02)
        if shard is not None:
            weights[name] = shard.take(name, weights[name], config)
    return weights


def dummy_info(path: str | Path | None, config: ModelConfig | None = None) -> ModelInfo:
    config = _config_from(path, config)
    return ModelInfo(
        path=Path(path) if path is not None else Path("dummy"),
        format="dummy",
        quantization="F32",
        family=config.architecture,
        architecture=config.architecture,
        parameter_count=config.num_parameters,
        context_length=config.max_position_embeddings,
        file_size=0,
        metadata={},
    )


def load_dummy(path: str | Path | None, config: ModelConfig | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0,
               device: str | torch.device = "cpu", shard: TensorShard | None = None
               ) -> LoadedModel:
    """Random weights on `device` shaped by `config`, by a name (``dummy:llama-3.1-8b``, see
    shapes.py) or by the config.json at `path`. A tokenizer in that directory is loaded too,
    so a dummy model can still serve text; a named shape gets a generated tokenizer of its
    vocabulary size (generated_tokenizer.py), so that it can be served and benchmarked as
    the real model would be."""
    start = time.perf_counter()
    config = _config_from(path, config)
    tokenizer = None
    generation_config: dict = {}
    if path is not None and not is_dummy_name(path) and Path(path).is_dir():
        from pagedserve.loader.hf import load_hf_tokenizer, read_generation_config

        generation_config = read_generation_config(Path(path))
        tokenizer = load_hf_tokenizer(Path(path), generation_config)
    elif is_dummy_name(path):
        from pagedserve.loader.generated_tokenizer import generated_tokenizer

        tokenizer = generated_tokenizer(config.vocab_size)
    weights = dummy_weights(config, dtype, seed, device, shard)
    logger.info("made dummy weights (%d parameters) in %.2f s", config.num_parameters,
                time.perf_counter() - start)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer,
                       info=dummy_info(path, config), generation_config=generation_config)
