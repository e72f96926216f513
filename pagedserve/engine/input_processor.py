"""Prompt and parameters -> an :class:`EngineCoreRequest`: validated, tokenized, sized; texts
to embed -> an :class:`EmbedRequest` the same way.

Runs in the front end, in any thread (the server tokenizes long prompts off its event loop).
It checks what depends on the model (token ids against the vocabulary, the prompt and answer
against the context, an embedding's inputs against the model's longest); ranges of sampling
values are SamplingParams' own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from pagedserve.engine.info import EngineInfo
from pagedserve.engine.messages import EmbedRequest, EngineCoreRequest
from pagedserve.errors import ContextLengthError, PromptTooLongError
from pagedserve.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, info: EngineInfo, client_index: int = 0) -> None:
        self.info = info
        self.client_index = client_index
        self._ids = itertools.count()

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> EngineCoreRequest:
        """Raises ValueError (whose message names the field) for input the model cannot take."""
        info = self.info
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("n must be 1 per engine request; the API layers fan out n > 1")
        vocab = info.vocab_size
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {t}")
        for t in params.logit_bias or ():
            if t >= vocab:
                raise ValueError(f"logit_bias must hold token ids in [0, {vocab}), got {t}")
        if isinstance(prompt, str):
            if info.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            if len(prompt) > info.max_prompt_chars:
                raise PromptTooLongError(info.max_model_len, len(prompt), info.max_prompt_chars)
            token_ids = info.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            for t in token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        n = len(token_ids)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = info.max_model_len - n
            if max_tokens < 1:
                raise ContextLengthError(info.max_model_len, n, 1)
        elif n + max_tokens > info.max_model_len:
            raise ContextLengthError(info.max_model_len, n, max_tokens)
        return EngineCoreRequest(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            params=params,
            max_tokens=max_tokens,
            arrival_time=arrival_time or time.monotonic(),
            client_index=self.client_index,
        )

    def make_embed_request(
        self,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        *,
        truncate: bool = True,
        normalize: bool = True,
        dimensions: int | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> EmbedRequest:
        """Texts (tokenized with the model's special tokens, cut to fit when `truncate`) or
        lists of token ids (taken as they are); raises ValueError naming ``input`` or
        ``dimensions`` for what the model cannot take."""
        embedding = self.info.embedding
        if embedding is None:
            raise ValueError("model: this model does not embed")
        if not inputs:
            raise ValueError("input must hold at least one text")
        embedding.check_dimensions(dimensions)
        if all(isinstance(x, str) for x in inputs):
            token_ids = embedding.tokenize(inputs, truncate)
        else:
            token_ids = [list(x) if isinstance(x, list | tuple) else x for x in inputs]
            for i, ids in enumerate(token_ids):
                if not isinstance(ids, list):
                    raise ValueError(f"input[{i}] must be a string or a list of token ids")
            embedding.check(token_ids)
        return EmbedRequest(
            request_id=request_id if request_id is not None else f"embd-{next(self._ids)}",
            token_ids=token_ids, normalize=normalize, dimensions=dimensions,
            arrival_time=arrival_time or time.monotonic(), client_index=self.client_index)
