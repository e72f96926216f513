"""Embedder: texts -> token ids -> one vector per text, for /api/embed and /v1/embeddings.

The engine-facing interface of embedding models. Two kinds of model sit behind it:

- an encoder (BERT, nomic-bert: `models/bert.py`), loaded from a Hugging Face directory or a
  GGUF file (`loader/encoder.py`), pooled as the file says (sentence-transformers' Pooling
  module, GGUF ``pooling_type``);
- a decoder the server already generates with (Llama, Qwen2: `models/llama.py`), whose final
  hidden states are pooled (`models/decoder_pooling.py`), the last token's by default.

The policy is Ollama's: ``tokenize`` adds the model's special tokens ([CLS] ... [SEP] for
BERT, BOS for a decoder) and, when asked to truncate, cuts the text so that the whole fits
``max_tokens``, keeping the special tokens (Hugging Face's ``truncation=True``); ``embed`` runs
a batch of token-id lists of any lengths, refuses any longer than ``max_tokens``, and returns
unit vectors unless told not to, cut to ``dimensions`` first when asked (Matryoshka).

A batch runs as few forward passes as its size allows: texts sorted by length are grouped
so that a group's padded size (texts x longest) stays under ``max_batch_tokens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from pagedserve.config import EngineConfig
from pagedserve.embedding_inputs import EmbeddingInputs, EmbeddingSpec
from pagedserve.loader.encoder import LoadedEncoder, encoder_architecture, load_encoder
from pagedserve.models.bert import BertEncoder, PackedBatch
from pagedserve.models.llama import LlamaForCausalLM
from pagedserve.models.pooling import PoolingType, check_pooling, finish, pool
from pagedserve.ops.attention import TORCH_BACKEND, AttentionBackend
from pagedserve.tokenizer import Tokenizer
from pagedserve.worker.decoder_pooling import pooled_hidden_states
from pagedserve.worker.execution_plan import Machine, resolve_execution_plan

DEFAULT_MAX_BATCH_TOKENS = 16384

__all__ = ["DEFAULT_MAX_BATCH_TOKENS", "Embedder", "EmbeddingInputs", "EmbeddingSpec"]


class PooledModel(Protocol):
    """A model that turns texts' token ids into one pooled hidden state per text."""

    def pooled(self, token_ids: list[list[int]], pooling: PoolingType) -> torch.Tensor:
        """(B, H) float32, in the order given."""
        ...


class EncoderModel:
    """`PooledModel` over a BertEncoder: one packed forward pass per call."""

    def __init__(self, encoder: BertEncoder) -> None:
        self.encoder = encoder

    def pooled(self, token_ids: list[list[int]], pooling: PoolingType) -> torch.Tensor:
        batch = PackedBatch.of(token_ids, self.encoder.device)
        return pool(self.encoder.forward(batch), batch.cu_seqlens, pooling)


class DecoderModel:
    """`PooledModel` over a LlamaForCausalLM and the attention backend it was built with."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend = TORCH_BACKEND
                 ) -> None:
        self.model, self.backend = model, backend

    def pooled(self, token_ids: list[list[int]], pooling: PoolingType) -> torch.Tensor:
        return pooled_hidden_states(self.model, token_ids, pooling, self.backend)


def post_processor_affixes(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer.json post-processor puts before and after a text's own ([CLS] and
    [SEP] for BERT), found by encoding a one-letter text with and without them."""
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ValueError("tokenizer: its post-processor rewrites a text's own tokens")


class Embedder:
    """Tokenize and embed texts with one model; see the module docstring for the policy."""

    def __init__(self, model: PooledModel, tokenizer: Tokenizer | None, spec: EmbeddingSpec,
                 vocab_size: int, affixes: tuple[list[int], list[int]] = ([], []),
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        """`affixes`: the special-token ids put before and after each text's own."""
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.vocab_size = vocab_size
        self.max_batch_tokens = max_batch_tokens
        # tokenizing and checking ids, without torch: what a server's front end holds
        self.inputs = EmbeddingInputs(tokenizer, spec, vocab_size, affixes)
        self.prefix, self.suffix = self.inputs.prefix, self.inputs.suffix

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path, *, load_format: str = "auto",
                  dtype: torch.dtype | str = torch.float32, device: str = "cpu",
                  pooling: str | None = None, **kw) -> Embedder:
        """An encoder model (bert, nomic-bert) from a directory or GGUF file; a decoder from
        one (llama, qwen2) with torch's attention and dense weights, its elementwise ops as an
        execution plan resolves them on `device`, pooled `pooling` (default "last")."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if encoder_architecture(path, load_format) is not None:
            return cls.from_encoder(load_encoder(path, load_format, dtype), dtype=dtype,
                                    device=device, pooling=pooling, **kw)
        from pagedserve.loader import ModelLoadError, load_model

        loaded = load_model(path, load_format, dtype=dtype)
        if loaded.tokenizer is None:
            raise ModelLoadError(f"{path} has no tokenizer; embedding texts needs one")
        plan = resolve_execution_plan(
            EngineConfig(device=device, dtype=str(dtype).removeprefix("torch."),
                         attention_backend="torch", low_bit_small_steps=False),
            Machine(build_kernels=False))
        model = LlamaForCausalLM(loaded.config, loaded.weights, dtype, device,
                                 consume_weights=True, fused_ops=plan.fused_ops)
        return cls.from_decoder(model, loaded.tokenizer, pooling=pooling or "last", **kw)

    @classmethod
    def from_encoder(cls, loaded: LoadedEncoder, *, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", pooling: str | None = None, **kw) -> Embedder:
        """From a `LoadedEncoder`; `pooling` overrides the model's own."""
        c = loaded.config
        spec = EmbeddingSpec(c.architecture, c.hidden_size, loaded.max_tokens,
                             c.max_position_embeddings,
                             check_pooling(pooling) if pooling else loaded.pooling,
                             loaded.normalize)
        encoder = BertEncoder(c, loaded.weights, dtype=dtype, device=device)
        return cls(EncoderModel(encoder), loaded.tokenizer, spec, c.vocab_size,
                   post_processor_affixes(loaded.tokenizer), **kw)

    @classmethod
    def from_decoder(cls, model: LlamaForCausalLM, tokenizer: Tokenizer | None, *,
                     pooling: str = "last", backend: AttentionBackend = TORCH_BACKEND,
                     max_tokens: int | None = None, **kw) -> Embedder:
        """From a LlamaForCausalLM (e.g. the engine's), built with attention `backend`
        (default torch); `max_tokens` defaults to the model's positions. Without a tokenizer
        (a dummy model) it embeds token ids only."""
        c = model.config
        spec = EmbeddingSpec(c.architecture, c.hidden_size,
                             max_tokens or c.max_position_embeddings, c.max_position_embeddings,
                             check_pooling(pooling), normalize=False)
        # BOS as the engine adds it to prompts (Tokenizer.encode), nothing after
        prefix = [tokenizer.bos_token_id] if tokenizer is not None and tokenizer.add_bos else []
        return cls(DecoderModel(model, backend), tokenizer, spec, c.vocab_size, (prefix, []),
                   **kw)

    # -- what the spec says ------------------------------------------------------------------

    @property
    def dimensions(self) -> int:
        return self.spec.dimensions

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    @property
    def max_position_embeddings(self) -> int:
        return self.spec.max_position_embeddings

    @property
    def pooling(self) -> PoolingType:
        return self.spec.pooling

    # -- the work ----------------------------------------------------------------------------

    def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        """Token ids of each text with the model's special tokens; a text too long for
        max_tokens is cut to fit when `truncate`, else refused (ValueError naming input)."""
        return self.inputs.tokenize(texts, truncate)

    def embed(self, token_ids: list[list[int]], *, normalize: bool = True,
              dimensions: int | None = None) -> torch.Tensor:
        """(B, dimensions or the model's) float32 on the CPU, row i embedding token_ids[i]."""
        self.inputs.check(token_ids)
        self.inputs.check_dimensions(dimensions)  # before the work, not after
        pooled = torch.empty(len(token_ids), self.dimensions, dtype=torch.float32)
        for group in self._groups(token_ids):
            rows = self.model.pooled([token_ids[i] for i in group], self.pooling)
            pooled[torch.tensor(group)] = rows.cpu()
        return finish(pooled, normalize, dimensions)

    def _groups(self, token_ids: list[list[int]]) -> list[list[int]]:
        """Indices of texts, longest first, in groups whose padded size fits the budget."""
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        groups: list[list[int]] = []
        for i in order:
            # the group's longest text is its first
            if groups and (len(groups[-1]) + 1) * len(token_ids[groups[-1][0]]) \
                    <= self.max_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
