"""The engine core of an embedding-only model: a BERT-family encoder, which generates nothing.

``pagedserve serve all-MiniLM-L6-v2`` (a Hugging Face directory or a GGUF of architecture
``bert`` or ``nomic-bert``) runs this core instead of :class:`EngineCore`: no scheduler, no KV
cache, no sampler; only an :class:`EmbeddingQueue` over the encoder, which the core loop runs
as it runs a generating core's. It answers the calls the loop makes of a core, with nothing to
step; a generation request reaching it is refused (the HTTP layers refuse them first, in each
API's words, since :attr:`EngineInfo.generates` is false).

:func:`load_core` looks at the model's files to choose between the two cores.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.config import EngineConfig
from pagedserve.engine.info import EngineInfo
from pagedserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
)

if TYPE_CHECKING:
    from pagedserve.engine.core import EngineCore
    from pagedserve.loader import ModelInfo
    from pagedserve.worker.embedder import Embedder

logger = logging.getLogger(__name__)


class EncoderCore:
    def __init__(self, embedder: Embedder, config: EngineConfig, model_info: ModelInfo | None,
                 model_name: str = "model") -> None:
        from pagedserve.engine.embedding_queue import EmbeddingQueue
        from pagedserve.worker.embedder import DEFAULT_MAX_BATCH_TOKENS

        self.config = config
        self.model_info = model_info
        self.model_name = model_name
        self.tokenizer = embedder.tokenizer
        self.embeddings = EmbeddingQueue(embedder, DEFAULT_MAX_BATCH_TOKENS)
        spec = embedder.spec
        token_chars = self.tokenizer.max_token_chars if self.tokenizer is not None else 1
        self.max_prompt_chars = config.max_prompt_chars or spec.max_tokens * token_chars
        logger.info("embedding model %s (%s, %s pooling): %d dimensions, inputs of up to %d "
                    "tokens; it does not generate", model_name, spec.architecture, spec.pooling,
                    spec.dimensions, spec.max_tokens)

    @classmethod
    def from_model(cls, model: str | Path, config: EngineConfig | None = None,
                   model_name: str | None = None, load_format: str = "auto") -> EncoderCore:
        import torch

        from pagedserve.device import check_device
        from pagedserve.loader.encoder import load_encoder
        from pagedserve.worker.embedder import Embedder
        from pagedserve.worker.execution_plan import resolve_dtype

        config = config or EngineConfig()
        check_device(config.device)
        config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, config.device))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = getattr(torch, config.dtype)
        loaded = load_encoder(model, load_format, dtype)
        embedder = Embedder.from_encoder(loaded, dtype=dtype, device=config.device)
        return cls(embedder, config, loaded.info, model_name or Path(model).name)

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.model_name, model_config=None, config=self.config,
            tokenizer=self.tokenizer, model_info=self.model_info,
            max_model_len=self.embeddings.inputs.max_tokens,
            max_prompt_chars=self.max_prompt_chars, max_num_seqs=self.config.max_num_seqs,
            kv_capacity_tokens=0, kv_num_blocks=0, embedding=self.embeddings.inputs)

    # -- what the core loop asks of a core: nothing to generate ----------------------------------

    def add_request(self, request: EngineCoreRequest, grammar: object = None) -> None:
        raise ValueError(f"model: {self.model_name} is an embedding model; it does not "
                         "generate")

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return []  # the loop aborts embedding requests in the queue itself

    def request_ids(self) -> set[str]:
        return set()

    def has_unfinished_requests(self) -> bool:
        return False

    def has_runnable_requests(self) -> bool:
        return False

    def step(self) -> EngineCoreOutputs:
        return EngineCoreOutputs(timestamp=time.monotonic(), stats=self.stats())

    def stats(self) -> EngineStats:
        return EngineStats(**self.embeddings.counters())

    def check_integrity(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_core(model: str, config: EngineConfig, model_name: str | None = None,
              load_format: str = "auto", progress: bool = False) -> EngineCore | EncoderCore:
    """The core for ``model``: an :class:`EncoderCore` for an encoder (read from config.json
    or the GGUF header alone), else a generating :class:`EngineCore`."""
    from pagedserve.engine.core import EngineCore

    if load_format != "dummy" and not str(model).startswith("dummy:"):
        from pagedserve.loader.encoder import encoder_architecture

        if encoder_architecture(model, load_format) is not None:
            return EncoderCore.from_model(model, config, model_name, load_format)
    return EngineCore.from_model(model, config, model_name=model_name, load_format=load_format,
                                 progress=progress)
