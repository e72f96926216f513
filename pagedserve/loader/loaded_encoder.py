"""What both encoder loaders return (`LoadedEncoder`) and check (the tensors a config needs).

Its own module, below `encoder.py` (which picks the loader) and `gguf_encoder.py`, so that the
GGUF loader does not import the module that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.loader.loaded_model import ModelInfo, ModelLoadError
from pagedserve.models.bert import EncoderConfig, encoder_weight_names
from pagedserve.models.pooling import PoolingType
from pagedserve.tokenizer import Tokenizer

GGUF_ARCHITECTURES = ("bert", "nomic-bert")


@dataclass(slots=True)
class LoadedEncoder:
    config: EncoderConfig
    weights: dict[str, torch.Tensor]  # BertModel names, (out_features, in_features)
    tokenizer: Tokenizer
    pooling: PoolingType  # the model's own: sentence-transformers' Pooling, GGUF pooling_type
    normalize: bool  # the model's own output is unit length (a sentence-transformers Normalize)
    max_tokens: int  # the longest input, special tokens included, the model is meant to read
    info: ModelInfo


def check_encoder_weights(weights: dict[str, torch.Tensor], config: EncoderConfig,
                          source: str) -> None:
    missing = [n for n in encoder_weight_names(config) if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source} is missing tensor {missing[0]!r}{more}")
