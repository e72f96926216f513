"""What an embedding model takes: its spec, and how texts become its token ids.

The half of :class:`~pagedserve.worker.embedder.Embedder` that needs no weights and no torch, so that
the server's front end holds it (``EngineInfo.embedding``, pickled to each front end with the
tokenizer) and tokenizes and refuses bad input there, before anything reaches the engine core.

The policy is Ollama's: a text gets the model's special tokens ([CLS] ... [SEP] for BERT, BOS
for a decoder) and, when truncating, is cut so that the whole fits ``max_tokens``, keeping the
special tokens (Hugging Face's ``truncation=True``)::

    [prefix ids] [the text's own ids, at most max_tokens - len(prefix) - len(suffix)] [suffix]

Token ids given directly (OpenAI's token-array input) are taken as they are, checked against
the vocabulary and ``max_tokens``, never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.models.pooling import PoolingType
    from pagedserve.tokenizer import Tokenizer


@dataclass(slots=True, frozen=True)
class EmbeddingSpec:
    """What callers need to know of an embedding model (plain values: it crosses processes)."""

    architecture: str  # "bert", "nomic-bert", "llama", "qwen2"
    dimensions: int  # length of a full embedding (the hidden size)
    max_tokens: int  # the longest input, special tokens included, that embed() accepts
    max_position_embeddings: int  # positions the model has (>= max_tokens)
    pooling: PoolingType
    normalize: bool  # the model's own outputs are unit length (sentence-transformers' Normalize)


def check_dimensions(dimensions: int | None, full: int) -> None:
    """A requested embedding length: None (all `full`) or an integer in [1, full]."""
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(
            dimensions, int) or not 1 <= dimensions <= full):
        raise ValueError(f"dimensions must be an integer from 1 to {full}, got {dimensions!r}")


class EmbeddingInputs:
    """Texts -> token ids for one embedding model, and the checks of ids it is given.

    Errors are ``ValueError`` whose message starts with ``input`` (``input[i]`` for one input),
    which the HTTP layers turn into a 400 naming the field.
    """

    def __init__(self, tokenizer: Tokenizer | None, spec: EmbeddingSpec, vocab_size: int,
                 affixes: tuple[Sequence[int], Sequence[int]] = ((), ())) -> None:
        """`affixes`: the special-token ids put before and after each text's own."""
        self.tokenizer, self.spec, self.vocab_size = tokenizer, spec, vocab_size
        self.prefix, self.suffix = list(affixes[0]), list(affixes[1])
        if len(self.prefix) + len(self.suffix) >= spec.max_tokens:
            raise ValueError(f"max_tokens ({spec.max_tokens}) leaves no room for a text")

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids of each text with the model's special tokens; a text too long for
        max_tokens is cut to fit when `truncate`, else refused."""
        if self.tokenizer is None:
            raise ValueError("input: this model has no tokenizer; pass token ids")
        room = self.max_tokens - len(self.prefix) - len(self.suffix)
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"input[{i}] must be a string, got {type(text).__name__}")
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > room:
                if not truncate:
                    raise ValueError(
                        f"input[{i}] has {len(ids) + len(self.prefix) + len(self.suffix)} "
                        f"tokens, more than the model's {self.max_tokens} (truncate it, or "
                        "allow truncation)")
                ids = ids[:room]
            full = self.prefix + ids + self.suffix
            if not full:
                raise ValueError(f"input[{i}] has no tokens")
            out.append(full)
        return out

    def check(self, token_ids: Sequence[Sequence[int]]) -> None:
        """Raise ValueError unless every input is a non-empty list of ids in the vocabulary,
        no longer than max_tokens."""
        if not token_ids:
            raise ValueError("input must hold at least one text")
        for i, ids in enumerate(token_ids):
            if not ids:
                raise ValueError(f"input[{i}] has no tokens")
            if len(ids) > self.max_tokens:
                raise ValueError(f"input[{i}] has {len(ids)} tokens, more than the model's "
                                 f"{self.max_tokens}")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"input[{i}] must hold integer token ids")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"input[{i}] holds a token id outside the vocabulary "
                                 f"[0, {self.vocab_size})")

    def check_dimensions(self, dimensions: int | None) -> None:
        check_dimensions(dimensions, self.spec.dimensions)
