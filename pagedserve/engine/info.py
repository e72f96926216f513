"""What a front end knows of the engine core it talks to, fixed once the model is loaded.

The core builds it after loading (it alone knows how large the KV cache came out, hence the
longest sequence) and hands it to each front end: in process as is, across processes pickled
once at start-up (the tokenizer travels with it, so front end and core read one vocabulary).

Every core embeds (``embedding``: how texts become the model's token ids, so that the front end
tokenizes them); a core of an embedding-only model (a BERT-family encoder) generates nothing:
it has no ``model_config`` and no KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.config import EngineConfig, ModelConfig
    from pagedserve.embedding_inputs import EmbeddingInputs
    from pagedserve.loader import ModelInfo
    from pagedserve.tokenizer import Tokenizer


@dataclass(slots=True)
class EngineInfo:
    model_name: str
    model_config: ModelConfig | None  # None: an embedding-only model, which does not generate
    config: EngineConfig  # resolved: dtype, kv_cache_dtype and device as the core runs them
    tokenizer: Tokenizer | None
    model_info: ModelInfo | None
    max_model_len: int  # prompt + answer, capped by what one sequence can hold in the cache
    # (an embedding-only model: its longest input)
    max_prompt_chars: int  # longer prompt texts cannot fit (see PromptTooLongError)
    max_num_seqs: int  # seats in a batch
    kv_capacity_tokens: int
    kv_num_blocks: int
    core_pid: int | None = None  # the engine core's process, when it runs in one
    embedding: EmbeddingInputs | None = None  # None: the model cannot embed

    @property
    def generates(self) -> bool:
        return self.model_config is not None

    @property
    def vocab_size(self) -> int:
        if self.model_config is not None:
            return self.model_config.vocab_size
        return self.embedding.vocab_size if self.embedding is not None else 0

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids) if self.tokenizer else frozenset()
